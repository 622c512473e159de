//! Material read from files and re-read when the files change (certificates, keys, CAs, the
//! tokens file), without dropping what already runs.
//!
//! A [`Reloadable`] holds the value built from its files and the bytes it was built from.
//! [`Reloadable::watch`] re-reads the files every interval and compares their bytes, so every
//! way a file can change is seen the same: a write in place, an atomic rename (kubelet,
//! cert-manager), or the `..data` symlink swap of a mounted Secret or ConfigMap. Modification
//! times are not trusted: a symlink swap keeps them, and a copy can set them back. When the
//! bytes differ, they must read the same at the next poll before the value is built again, so
//! a file rewritten in place (truncated, then written) is never applied half read. A file that
//! does not build (a certificate and key that do not match) is logged and the old value kept,
//! and the next change is tried again. New connections take [`Reloadable::get`]; live ones
//! keep what they started with.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

type Build<T> = dyn Fn(&[Vec<u8>]) -> Result<T, String> + Send + Sync;

/// The bytes of every file, in order.
type Bytes = Vec<Vec<u8>>;

struct Source<T> {
    name: String,
    files: Vec<PathBuf>,
    build: Box<Build<T>>,
    /// The bytes in use, and changed bytes seen once and waiting to be seen again.
    last: Mutex<(Bytes, Option<Bytes>)>,
    /// Changes applied, and changes that did not load.
    replaced: AtomicU64,
    kept: AtomicU64,
}

/// How a reloadable's changes went, for metrics: its name, changes applied, changes refused.
pub trait ReloadStats: Send + Sync {
    /// The material's name (it names its flags).
    fn name(&self) -> &str;
    /// Changes applied so far, and changes that did not load.
    fn counts(&self) -> (u64, u64);
}

impl<T> ReloadStats for Source<T> {
    fn name(&self) -> &str {
        &self.name
    }

    fn counts(&self) -> (u64, u64) {
        (
            self.replaced.load(Ordering::Relaxed),
            self.kept.load(Ordering::Relaxed),
        )
    }
}

/// A value built from files, replaced when they change and the new files are good.
pub struct Reloadable<T> {
    current: Arc<RwLock<Arc<T>>>,
    source: Option<Arc<Source<T>>>,
}

impl<T> Clone for Reloadable<T> {
    fn clone(&self) -> Self {
        Reloadable {
            current: self.current.clone(),
            source: self.source.clone(),
        }
    }
}

impl<T> From<Arc<T>> for Reloadable<T> {
    /// A value that never changes (no files behind it).
    fn from(value: Arc<T>) -> Self {
        Reloadable {
            current: Arc::new(RwLock::new(value)),
            source: None,
        }
    }
}

impl<T> From<T> for Reloadable<T> {
    fn from(value: T) -> Self {
        Arc::new(value).into()
    }
}

/// How a reload went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reload {
    /// The files have the bytes they had.
    Unchanged,
    /// The files changed since the last poll: they are applied if the next poll reads the
    /// same bytes.
    Settling,
    /// The files changed and the new value is in use.
    Replaced,
    /// The files changed but do not build (the reason); the old value stays.
    Kept(String),
}

fn read_all(files: &[PathBuf]) -> Result<Vec<Vec<u8>>, String> {
    files
        .iter()
        .map(|p| std::fs::read(p).map_err(|e| format!("{}: {e}", p.display())))
        .collect()
}

impl<T: Send + Sync + 'static> Reloadable<T> {
    /// Reads `files` and builds the first value; `name` names the material in logs. The first
    /// value must build: a bad file at startup is an error that names it.
    pub fn load(
        name: impl Into<String>,
        files: Vec<PathBuf>,
        build: impl Fn(&[Vec<u8>]) -> Result<T, String> + Send + Sync + 'static,
    ) -> Result<Reloadable<T>, String> {
        let name = name.into();
        let bytes = read_all(&files).map_err(|e| format!("{name}: {e}"))?;
        let value = build(&bytes).map_err(|e| format!("{name}: {e}"))?;
        Ok(Reloadable {
            current: Arc::new(RwLock::new(Arc::new(value))),
            source: Some(Arc::new(Source {
                name,
                files,
                build: Box::new(build),
                last: Mutex::new((bytes, None)),
                replaced: AtomicU64::new(0),
                kept: AtomicU64::new(0),
            })),
        })
    }

    /// The value in use now.
    pub fn get(&self) -> Arc<T> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Reads the files again and, if their bytes changed, read the same as at the previous
    /// poll, and build, replaces the value. One poll at a time: reading, comparing and
    /// building happen under one lock, so two watchers cannot apply an older read last.
    pub fn reload(&self) -> Reload {
        let Some(src) = &self.source else {
            return Reload::Unchanged;
        };
        let mut last = src.last.lock().unwrap_or_else(|e| e.into_inner());
        let bytes = match read_all(&src.files) {
            Ok(b) => b,
            Err(e) => {
                last.1 = None;
                src.kept.fetch_add(1, Ordering::Relaxed);
                return Reload::Kept(e);
            }
        };
        if last.0 == bytes {
            last.1 = None;
            return Reload::Unchanged;
        }
        if last.1.as_ref() != Some(&bytes) {
            last.1 = Some(bytes);
            return Reload::Settling;
        }
        last.1 = None;
        match (src.build)(&bytes) {
            Ok(value) => {
                *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(value);
                last.0 = bytes;
                src.replaced.fetch_add(1, Ordering::Relaxed);
                Reload::Replaced
            }
            Err(e) => {
                src.kept.fetch_add(1, Ordering::Relaxed);
                Reload::Kept(e)
            }
        }
    }

    /// Its counts, for metrics (none for a value with no files).
    pub fn stats(&self) -> Option<Arc<dyn ReloadStats>> {
        self.source.clone().map(|s| s as Arc<dyn ReloadStats>)
    }

    /// Re-reads the files every `every` while the returned task runs (none for a value with no
    /// files). Each change is logged: replaced, or kept with the reason.
    pub fn watch(&self, every: Duration) -> Option<tokio::task::JoinHandle<()>> {
        let src = self.source.clone()?;
        let this = self.clone();
        Some(tokio::spawn(async move {
            let mut tick = tokio::time::interval(every.max(Duration::from_millis(10)));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            // A file that stays bad is logged once per change of its bytes, not every tick.
            let mut last_error = None;
            loop {
                tick.tick().await;
                match this.reload() {
                    Reload::Unchanged | Reload::Settling => {}
                    Reload::Replaced => {
                        last_error = None;
                        tracing::info!(material = %src.name, files = ?src.files, "reloaded: new connections use it, live ones keep theirs");
                    }
                    Reload::Kept(e) => {
                        if last_error.as_ref() != Some(&e) {
                            tracing::error!(material = %src.name, error = %e, "the changed files do not load; the old ones stay in use");
                        }
                        last_error = Some(e);
                    }
                }
            }
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn numbers(dir: &std::path::Path) -> Reloadable<u32> {
        Reloadable::load("n", vec![dir.join("n")], |b| {
            std::str::from_utf8(&b[0])
                .map_err(|e| e.to_string())?
                .trim()
                .parse()
                .map_err(|e: std::num::ParseIntError| e.to_string())
        })
        .unwrap()
    }

    #[test]
    fn a_changed_file_replaces_the_value_and_a_bad_one_keeps_the_old() {
        let dir = tempdir("reload");
        std::fs::write(dir.join("n"), "1").unwrap();
        let r = numbers(&dir);
        assert_eq!(*r.get(), 1);
        assert_eq!(r.reload(), Reload::Unchanged);
        std::fs::write(dir.join("n"), "2").unwrap();
        assert_eq!(r.reload(), Reload::Settling, "seen once: not yet");
        assert_eq!(*r.get(), 1);
        assert_eq!(
            r.reload(),
            Reload::Replaced,
            "the same bytes twice: applied"
        );
        assert_eq!(*r.get(), 2);
        std::fs::write(dir.join("n"), "two").unwrap();
        assert_eq!(r.reload(), Reload::Settling);
        assert!(matches!(r.reload(), Reload::Kept(_)));
        assert_eq!(*r.get(), 2);
        std::fs::remove_file(dir.join("n")).unwrap();
        assert!(matches!(r.reload(), Reload::Kept(_)));
        assert_eq!(*r.get(), 2);
        std::fs::write(dir.join("n"), "3").unwrap();
        assert_eq!(r.reload(), Reload::Settling);
        assert_eq!(r.reload(), Reload::Replaced);
        assert_eq!(*r.get(), 3);
    }

    #[test]
    fn a_file_caught_half_written_is_never_applied() {
        // Rewritten in place: the first poll reads it truncated, the next one whole.
        let dir = tempdir("half");
        std::fs::write(dir.join("n"), "12").unwrap();
        let r = numbers(&dir);
        std::fs::write(dir.join("n"), "3").unwrap();
        assert_eq!(r.reload(), Reload::Settling);
        std::fs::write(dir.join("n"), "345").unwrap();
        assert_eq!(r.reload(), Reload::Settling, "changed again: wait again");
        assert_eq!(*r.get(), 12);
        assert_eq!(r.reload(), Reload::Replaced);
        assert_eq!(*r.get(), 345);
    }

    #[cfg(unix)]
    #[test]
    fn a_secret_volume_symlink_swap_is_seen() {
        // A mounted Secret: `n -> ..data/n`, `..data -> ..v1`; an update writes `..v2` and
        // renames a new `..data` link over the old one.
        let dir = tempdir("swap");
        std::fs::create_dir(dir.join("..v1")).unwrap();
        std::fs::write(dir.join("..v1/n"), "1").unwrap();
        std::os::unix::fs::symlink("..v1", dir.join("..data")).unwrap();
        std::os::unix::fs::symlink("..data/n", dir.join("n")).unwrap();
        let r = numbers(&dir);
        assert_eq!(*r.get(), 1);
        std::fs::create_dir(dir.join("..v2")).unwrap();
        std::fs::write(dir.join("..v2/n"), "7").unwrap();
        std::os::unix::fs::symlink("..v2", dir.join("..data_tmp")).unwrap();
        std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
        std::fs::remove_dir_all(dir.join("..v1")).unwrap();
        assert_eq!(r.reload(), Reload::Settling);
        assert_eq!(r.reload(), Reload::Replaced);
        assert_eq!(*r.get(), 7);
    }

    #[test]
    fn a_fixed_value_never_reloads() {
        let r: Reloadable<u32> = 5.into();
        assert_eq!(r.reload(), Reload::Unchanged);
        assert_eq!(*r.get(), 5);
    }

    fn tempdir(tag: &str) -> PathBuf {
        static N: AtomicU64 = AtomicU64::new(0);
        let d = std::env::temp_dir().join(format!(
            "tether-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}
