//! Network namespaces: named ones under `/var/run/netns` (what `ip netns add/del` does), and
//! running code inside any namespace on a dedicated thread.
//!
//! A network namespace belongs to a thread, not to a process: `setns(2)` on a fresh thread moves
//! only that thread. Sockets remember the namespace they were opened in, so the pattern used all
//! over this crate is "open the socket on a thread inside the namespace, then use it from
//! anywhere" ([`crate::Netlink::open_in`]).

use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{setns, unshare, CloneFlags};

use crate::KernelError;

/// Where named namespaces live, as with `ip netns`.
pub const NETNS_RUN_DIR: &str = "/var/run/netns";

fn netns_err(path: &Path, op: &'static str, source: io::Error) -> KernelError {
    KernelError::Netns {
        path: path.to_path_buf(),
        op,
        source,
    }
}

fn nix_io(e: nix::Error) -> io::Error {
    io::Error::from_raw_os_error(e as i32)
}

/// Runs `f` on a new thread that has entered the network namespace at `path` (a bind mount
/// under `/var/run/netns`, or `/proc/<pid>/ns/net`), and returns its result. The calling thread
/// never changes namespace.
pub fn run_in<T, F>(path: &Path, f: F) -> Result<T, KernelError>
where
    T: Send,
    F: FnOnce() -> T + Send,
{
    let file = File::open(path).map_err(|e| netns_err(path, "open", e))?;
    std::thread::scope(|s| {
        let handle = std::thread::Builder::new()
            .name("margay-netns".into())
            .spawn_scoped(s, move || -> Result<T, KernelError> {
                setns(&file, CloneFlags::CLONE_NEWNET)
                    .map_err(|e| netns_err(path, "setns", nix_io(e)))?;
                Ok(f())
            })
            .map_err(|e| netns_err(path, "spawn thread", e))?;
        match handle.join() {
            Ok(r) => r,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

/// A named network namespace (`/var/run/netns/<name>`). Dropping this value does not delete
/// the namespace; see [`OwnedNetns`] for that.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Netns {
    name: String,
    path: PathBuf,
}

impl Netns {
    /// Creates a named namespace like `ip netns add <name>`: a fresh network namespace
    /// bind-mounted at `/var/run/netns/<name>`. Fails if the name is taken.
    pub fn create(name: &str) -> Result<Netns, KernelError> {
        validate_name(name)?;
        let dir = Path::new(NETNS_RUN_DIR);
        fs::create_dir_all(dir).map_err(|e| netns_err(dir, "create directory", e))?;
        let path = dir.join(name);
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| netns_err(&path, "create mount point", e))?;
        let mounted = std::thread::scope(|s| {
            std::thread::Builder::new()
                .name("margay-netns-add".into())
                .spawn_scoped(s, || -> Result<(), KernelError> {
                    // unshare(CLONE_NEWNET) moves only this thread, which exits right after.
                    unshare(CloneFlags::CLONE_NEWNET)
                        .map_err(|e| netns_err(&path, "unshare", nix_io(e)))?;
                    mount(
                        Some("/proc/thread-self/ns/net"),
                        &path,
                        None::<&str>,
                        MsFlags::MS_BIND,
                        None::<&str>,
                    )
                    .map_err(|e| netns_err(&path, "bind mount", nix_io(e)))
                })
                .map_err(|e| netns_err(&path, "spawn thread", e))?
                .join()
                .unwrap_or_else(|p| std::panic::resume_unwind(p))
        });
        if let Err(e) = mounted {
            let _ = fs::remove_file(&path);
            return Err(e);
        }
        Ok(Netns {
            name: name.to_string(),
            path,
        })
    }

    /// Refers to an existing named namespace (it is not checked).
    pub fn named(name: &str) -> Netns {
        Netns {
            name: name.to_string(),
            path: Path::new(NETNS_RUN_DIR).join(name),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` on a thread inside this namespace.
    pub fn run<T, F>(&self, f: F) -> Result<T, KernelError>
    where
        T: Send,
        F: FnOnce() -> T + Send,
    {
        run_in(&self.path, f)
    }

    /// Deletes a named namespace like `ip netns del`. A namespace already gone is success.
    pub fn delete(&self) -> Result<(), KernelError> {
        delete_named(&self.name)
    }
}

/// Deletes `/var/run/netns/<name>`; gone is success. The namespace itself disappears once no
/// process or socket holds it.
pub fn delete_named(name: &str) -> Result<(), KernelError> {
    validate_name(name)?;
    let path = Path::new(NETNS_RUN_DIR).join(name);
    match umount2(&path, MntFlags::MNT_DETACH) {
        Ok(()) | Err(nix::Error::EINVAL) | Err(nix::Error::ENOENT) => {}
        Err(e) => return Err(netns_err(&path, "unmount", nix_io(e))),
    }
    match fs::remove_file(&path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(netns_err(&path, "remove", e)),
    }
}

/// Names of the namespaces under `/var/run/netns`.
pub fn list_named() -> Result<Vec<String>, KernelError> {
    let dir = Path::new(NETNS_RUN_DIR);
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(netns_err(dir, "list", e)),
    };
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    names.sort();
    Ok(names)
}

fn validate_name(name: &str) -> Result<(), KernelError> {
    if name.is_empty() || name.contains('/') || name == "." || name == ".." {
        return Err(KernelError::Invalid(format!(
            "{name:?} is not a namespace name (non-empty, no '/')"
        )));
    }
    Ok(())
}

/// A named namespace that is deleted when this value is dropped: for tests, the benchmark and
/// the lab.
#[derive(Debug)]
pub struct OwnedNetns(Netns);

impl OwnedNetns {
    pub fn create(name: &str) -> Result<OwnedNetns, KernelError> {
        Netns::create(name).map(OwnedNetns)
    }
}

impl std::ops::Deref for OwnedNetns {
    type Target = Netns;
    fn deref(&self) -> &Netns {
        &self.0
    }
}

impl Drop for OwnedNetns {
    fn drop(&mut self) {
        if let Err(e) = self.0.delete() {
            tracing::warn!(netns = %self.0.name, error = %e, "cannot delete network namespace");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_with_slashes_are_refused() {
        assert!(validate_name("a/b").is_err());
        assert!(validate_name("..").is_err());
        assert!(validate_name("").is_err());
        assert!(validate_name("mgk-1-2").is_ok());
    }
}
