//! Datapath maps: endpoints, identities, policy, quarantine and connection tracking.
//! (Filled in by the segmentation work; the quarantine flag is checked first per packet.)
