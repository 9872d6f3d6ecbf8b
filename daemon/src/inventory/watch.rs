//! Watches the inventory file and publishes each new valid inventory (the last good one stays).
//!
//! The parent directory is watched, not the file: editors save by writing a new file and
//! renaming it over the old one, and Kubernetes ConfigMap volumes swap a `..data` symlink, and
//! both replace the inode a file watch would be attached to. Any event in the directory makes
//! the watcher re-read the file (after a short debounce, since one save is several events);
//! an unchanged text is ignored, an invalid one is logged with its file, line and field and the
//! last good inventory stays published.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use notify::{RecursiveMode, Watcher as _};
use tokio::sync::{mpsc, watch};

use super::{Inventory, InventoryError};

/// How long to wait after a change for the writer to finish.
pub const DEFAULT_DEBOUNCE: Duration = Duration::from_millis(100);

#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    /// The file must be valid when watching starts: there is no last good inventory yet.
    #[error("initial inventory: {0}")]
    Initial(#[from] InventoryError),
    #[error("cannot watch {path}: {source}")]
    Watch {
        path: PathBuf,
        #[source]
        source: notify::Error,
    },
    #[error("inventory watching needs a tokio runtime: {0}")]
    NoRuntime(#[from] tokio::runtime::TryCurrentError),
}

/// A running watch. Dropping it stops watching; receivers then see the channel closed.
pub struct InventoryWatch {
    inventory: watch::Receiver<Arc<Inventory>>,
    last_error: watch::Receiver<Option<String>>,
    task: tokio::task::JoinHandle<()>,
}

impl InventoryWatch {
    /// Loads `path` (which must be valid) and starts watching it. Needs a tokio runtime.
    pub fn start(path: impl Into<PathBuf>) -> Result<InventoryWatch, WatchError> {
        InventoryWatch::with_debounce(path, DEFAULT_DEBOUNCE)
    }

    pub fn with_debounce(path: impl Into<PathBuf>, debounce: Duration) -> Result<InventoryWatch, WatchError> {
        let runtime = tokio::runtime::Handle::try_current()?;
        let path = path.into();
        let text = read(&path)?;
        let initial = Inventory::parse(&text, &path)?;
        let (inventory_tx, inventory_rx) = watch::channel(Arc::new(initial));
        let (error_tx, error_rx) = watch::channel(None);
        let (event_tx, event_rx) = mpsc::unbounded_channel();

        let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            if let Err(err) = &event {
                tracing::warn!(error = %err, "inventory watch event error; re-reading the file");
            }
            // The receiver is gone only when the watch stops; nothing left to tell.
            let _ = event_tx.send(());
        })
        .map_err(|source| WatchError::Watch { path: path.clone(), source })?;
        let mut reloader = Reloader {
            path,
            watcher: Arc::new(Mutex::new(watcher)),
            watched_dirs: Vec::new(),
            last_text: text,
            inventory: inventory_tx,
            last_error: error_tx,
        };
        reloader.watch_dirs()?;
        let task = runtime.spawn(reloader.run(event_rx, debounce));
        Ok(InventoryWatch { inventory: inventory_rx, last_error: error_rx, task })
    }

    /// A receiver of every new valid inventory (starts at the current one), shared: nobody
    /// copies it.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Inventory>> {
        self.inventory.clone()
    }

    /// The current (last good) inventory.
    pub fn current(&self) -> Arc<Inventory> {
        self.inventory.borrow().clone()
    }

    /// Why the file on disk is not the published inventory (`None` when it is): for status
    /// output, so an operator sees a rejected edit without reading logs.
    pub fn last_error(&self) -> watch::Receiver<Option<String>> {
        self.last_error.clone()
    }
}

impl Drop for InventoryWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn read(path: &Path) -> Result<String, InventoryError> {
    Inventory::read(path)
}

struct Reloader {
    path: PathBuf,
    watcher: Arc<Mutex<notify::RecommendedWatcher>>,
    watched_dirs: Vec<PathBuf>,
    last_text: String,
    inventory: watch::Sender<Arc<Inventory>>,
    last_error: watch::Sender<Option<String>>,
}

impl Reloader {
    /// Watches the directory of the path as given and, when it is a symlink, the directory of
    /// its target too (a symlink into another directory would otherwise hide edits).
    fn watch_dirs(&mut self) -> Result<(), WatchError> {
        let mut dirs = vec![parent_dir(&self.path)];
        if let Ok(target) = std::fs::canonicalize(&self.path) {
            dirs.push(parent_dir(&target));
        }
        for dir in dirs {
            if self.watched_dirs.contains(&dir) {
                continue;
            }
            let result = match self.watcher.lock() {
                Ok(mut watcher) => watcher.watch(&dir, RecursiveMode::NonRecursive),
                Err(poisoned) => poisoned.into_inner().watch(&dir, RecursiveMode::NonRecursive),
            };
            result.map_err(|source| WatchError::Watch { path: dir.clone(), source })?;
            tracing::debug!(dir = %dir.display(), "watching for inventory changes");
            self.watched_dirs.push(dir);
        }
        Ok(())
    }

    async fn run(mut self, mut events: mpsc::UnboundedReceiver<()>, debounce: Duration) {
        while events.recv().await.is_some() {
            tokio::time::sleep(debounce).await;
            while events.try_recv().is_ok() {}
            self.reload();
        }
    }

    fn reload(&mut self) {
        let text = match read(&self.path) {
            Ok(text) => text,
            Err(err @ InventoryError::Limit { .. }) => {
                // Not a transient state: refused like an invalid inventory.
                tracing::error!(file = %self.path.display(), error = %err, "inventory refused; keeping the last good one");
                self.last_error.send_replace(Some(err.to_string()));
                return;
            }
            Err(err) => {
                // Mid-replace (delete then create): the next event re-reads it.
                tracing::warn!(file = %self.path.display(), error = %err, "inventory not readable; keeping the last good one");
                return;
            }
        };
        if text == self.last_text {
            return;
        }
        self.last_text = text;
        if let Err(err) = self.watch_dirs() {
            tracing::warn!(error = %err, "cannot watch the inventory's new symlink target");
        }
        match Inventory::parse(&self.last_text, &self.path) {
            Ok(inventory) => {
                self.last_error.send_replace(None);
                let endpoints = inventory.endpoints.len();
                let changed = self.inventory.send_if_modified(|current| {
                    if **current == inventory {
                        false
                    } else {
                        *current = Arc::new(inventory);
                        true
                    }
                });
                if changed {
                    tracing::info!(file = %self.path.display(), endpoints, "inventory reloaded");
                }
            }
            Err(err) => {
                tracing::error!(
                    file = %self.path.display(),
                    error = %err,
                    "invalid inventory; keeping the last good one"
                );
                self.last_error.send_replace(Some(err.to_string()));
            }
        }
    }
}

fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD_A: &str = "endpoints:\n  - namespace: shop\n    name: a\n    ips: [198.18.1.10]\n";
    const GOOD_B: &str = "endpoints:\n  - namespace: shop\n    name: b\n    ips: [198.18.1.11]\n";
    const BAD: &str = "endpoints:\n  - namespace: shop\n    name: c\n    ips: [198.18.1.12]\n    colour: blue\n";
    const DEBOUNCE: Duration = Duration::from_millis(30);

    fn temp_dir(test: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("palisade-inventory-watch-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create temp dir");
        dir
    }

    /// Saves the way editors do: a new file renamed over the old one.
    fn replace(path: &Path, text: &str) {
        let tmp = path.with_extension("tmp~");
        std::fs::write(&tmp, text).expect("write temp file");
        std::fs::rename(&tmp, path).expect("rename over inventory");
    }

    fn names(inventory: &Inventory) -> Vec<String> {
        inventory.endpoints.iter().map(|e| e.key()).collect()
    }

    async fn next(rx: &mut watch::Receiver<Arc<Inventory>>) -> Arc<Inventory> {
        tokio::time::timeout(Duration::from_secs(5), rx.changed())
            .await
            .expect("no new inventory within 5 s")
            .expect("watch stopped");
        rx.borrow_and_update().clone()
    }

    /// Long enough for an event to be noticed, debounced and handled.
    async fn settle() {
        tokio::time::sleep(DEBOUNCE * 10).await;
    }

    #[tokio::test]
    async fn publishes_good_keeps_last_good_on_bad() {
        let dir = temp_dir("good-bad-good");
        let path = dir.join("inventory.yaml");
        std::fs::write(&path, GOOD_A).unwrap();
        let watch = InventoryWatch::with_debounce(&path, DEBOUNCE).expect("start");
        let mut rx = watch.subscribe();
        assert_eq!(names(&rx.borrow_and_update()), ["shop/a"]);

        // In-place write of an invalid file: nothing published, the error names file and line.
        std::fs::write(&path, BAD).unwrap();
        settle().await;
        assert!(!rx.has_changed().unwrap(), "an invalid inventory was published");
        assert_eq!(names(&watch.current()), ["shop/a"]);
        let error = watch.last_error().borrow().clone().expect("the rejection is reported");
        assert!(error.contains("inventory.yaml:5:") && error.contains("colour"), "{error}");

        // Editor-style replace with a valid file: published.
        replace(&path, GOOD_B);
        assert_eq!(names(&*next(&mut rx).await), ["shop/b"]);
        assert_eq!(*watch.last_error().borrow(), None);

        // Touching without changing publishes nothing.
        std::fs::write(&path, GOOD_B).unwrap();
        settle().await;
        assert!(!rx.has_changed().unwrap());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn follows_configmap_symlink_swaps() {
        // The kubelet's layout: inventory.yaml -> ..data/inventory.yaml, ..data -> ..v1.
        let dir = temp_dir("configmap");
        std::fs::create_dir(dir.join("..v1")).unwrap();
        std::fs::write(dir.join("..v1/inventory.yaml"), GOOD_A).unwrap();
        std::os::unix::fs::symlink("..v1", dir.join("..data")).unwrap();
        std::os::unix::fs::symlink("..data/inventory.yaml", dir.join("inventory.yaml")).unwrap();
        let watch = InventoryWatch::with_debounce(dir.join("inventory.yaml"), DEBOUNCE).expect("start");
        let mut rx = watch.subscribe();
        assert_eq!(names(&rx.borrow_and_update()), ["shop/a"]);

        // An update: new version directory, new symlink renamed over ..data.
        std::fs::create_dir(dir.join("..v2")).unwrap();
        std::fs::write(dir.join("..v2/inventory.yaml"), GOOD_B).unwrap();
        std::os::unix::fs::symlink("..v2", dir.join("..data_tmp")).unwrap();
        std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
        std::fs::remove_dir_all(dir.join("..v1")).unwrap();
        assert_eq!(names(&*next(&mut rx).await), ["shop/b"]);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn an_invalid_file_at_start_is_an_error() {
        let dir = temp_dir("bad-start");
        let path = dir.join("inventory.yaml");
        std::fs::write(&path, BAD).unwrap();
        let err = InventoryWatch::start(&path).err().expect("invalid inventory accepted");
        assert!(err.to_string().contains("colour"), "{err}");
        let missing = InventoryWatch::start(dir.join("missing.yaml")).err().expect("missing file accepted");
        assert!(matches!(missing, WatchError::Initial(InventoryError::Read { .. })), "{missing}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
