//! Watches the inventory file and publishes each new valid inventory (the last good one stays).
