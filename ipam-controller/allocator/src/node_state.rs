//! The node's IPAM state, under the CNI plugin's state directory (default `/var/lib/margay`),
//! which the plugin and the node agent share:
//!
//! - `attachments/<containerID>:<ifname>`: one record per attachment the plugin made: the host
//!   veth, the addresses with their allocation sequence numbers. Written after the allocation
//!   and before the veth exists, removed after DEL has released. DEL uses it to release exactly
//!   what ADD got (by sequence number) and to know which host veth is whose; GC uses it to map
//!   `cali*` veths to attachments.
//! - `pending-releases/<containerID>`: releases DEL could not complete because the datastore
//!   was unreachable. Every later plugin run, and the node agent
//!   ([`crate::pending::drain_pending_releases`]), retries them.
//! - `ipam.lock`: serialises the allocator calls of concurrent plugin runs on the node, so
//!   that a burst of ADDs does not fight over the node's block with compare-and-swap retries.
//!
//! Every file is written to a temporary name in the same directory and renamed into place, so
//! a reader (or a crash) never sees half a record.

use serde::{Deserialize, Serialize};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

/// One address of an attachment, with the sequence number of its allocation (when the
/// allocator gave one).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordedIp {
    pub ip: IpAddr,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
}

/// What ADD did for one attachment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AttachmentRecord {
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
    /// The host side of the veth.
    pub host_veth: String,
    pub netns: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    /// The IPAM handle (`k8s-pod-network.<containerID>`).
    pub handle: String,
    /// The addresses and their sequence numbers; empty when a delegated IPAM plugin gave them.
    pub ips: Vec<RecordedIp>,
    /// The IPAM plugin type (`margay-ipam` in process, anything else delegated).
    pub ipam_type: String,
    /// The WorkloadEndpoint written in etcd mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload_endpoint: Option<String>,
}

/// A release DEL could not complete.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PendingRelease {
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub handle: String,
    /// The node whose allocator releases it.
    pub node: String,
    /// With sequence numbers: release exactly these allocations. Empty: release by handle.
    pub ips: Vec<RecordedIp>,
    /// The WorkloadEndpoint to delete (only if it still names this container).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload_endpoint: Option<String>,
    /// When DEL recorded it (seconds since the epoch).
    pub since: u64,
}

/// The state directory.
#[derive(Debug, Clone)]
pub struct StateDir {
    root: PathBuf,
}

fn io_err(path: &Path, what: &str, e: std::io::Error) -> std::io::Error {
    std::io::Error::new(e.kind(), format!("{what} {}: {e}", path.display()))
}

/// Writes `bytes` to `path` atomically: a temporary file in the same directory, then a rename.
/// With `durable`, the file is synced before the rename.
pub fn write_atomic(path: &Path, bytes: &[u8], durable: bool) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(|e| io_err(dir, "create directory", e))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp.{}", std::process::id()));
    let res = (|| {
        let mut f = File::create(&tmp).map_err(|e| io_err(&tmp, "create", e))?;
        f.write_all(bytes).map_err(|e| io_err(&tmp, "write", e))?;
        if durable {
            f.sync_all().map_err(|e| io_err(&tmp, "sync", e))?;
        }
        fs::rename(&tmp, path).map_err(|e| io_err(path, "rename into", e))
    })();
    if res.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    res
}

fn remove_if_present(path: &Path) -> std::io::Result<()> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err(path, "remove", e)),
    }
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> std::io::Result<Option<T>> {
    match fs::read(path) {
        Ok(b) => serde_json::from_slice(&b).map(Some).map_err(|e| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{}: {e}", path.display()),
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err(path, "read", e)),
    }
}

/// The files of `dir` that are not temporary ones, sorted.
fn list_dir(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err(dir, "list", e)),
    };
    let mut out: Vec<PathBuf> = entries
        .filter_map(|e| e.ok())
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .map(|e| e.path())
        .collect();
    out.sort();
    Ok(out)
}

impl StateDir {
    pub fn new(root: impl Into<PathBuf>) -> StateDir {
        StateDir { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn attachments(&self) -> PathBuf {
        self.root.join("attachments")
    }

    pub fn pending_dir(&self) -> PathBuf {
        self.root.join("pending-releases")
    }

    fn attachment_path(&self, container_id: &str, ifname: &str) -> PathBuf {
        // Neither a container ID nor an interface name may contain ':'.
        self.attachments().join(format!("{container_id}:{ifname}"))
    }

    pub fn read_attachment(
        &self,
        container_id: &str,
        ifname: &str,
    ) -> std::io::Result<Option<AttachmentRecord>> {
        read_json(&self.attachment_path(container_id, ifname))
    }

    pub fn write_attachment(&self, r: &AttachmentRecord) -> std::io::Result<()> {
        let bytes = serde_json::to_vec(r).map_err(std::io::Error::other)?;
        write_atomic(
            &self.attachment_path(&r.container_id, &r.ifname),
            &bytes,
            false,
        )
    }

    pub fn remove_attachment(&self, container_id: &str, ifname: &str) -> std::io::Result<()> {
        remove_if_present(&self.attachment_path(container_id, ifname))
    }

    /// Every attachment record. Unreadable records are skipped (and reported in the log).
    pub fn attachments_all(&self) -> std::io::Result<Vec<AttachmentRecord>> {
        let mut out = Vec::new();
        for p in list_dir(&self.attachments())? {
            match read_json::<AttachmentRecord>(&p) {
                Ok(Some(r)) => out.push(r),
                Ok(None) => {}
                Err(e) => tracing::warn!(error = %e, "skipping an unreadable attachment record"),
            }
        }
        Ok(out)
    }

    fn pending_path(&self, container_id: &str) -> PathBuf {
        self.pending_dir().join(container_id)
    }

    /// Records a release to retry. Synced to disk: it is the only trace of the allocation.
    pub fn write_pending(&self, p: &PendingRelease) -> std::io::Result<()> {
        let bytes = serde_json::to_vec(p).map_err(std::io::Error::other)?;
        write_atomic(&self.pending_path(&p.container_id), &bytes, true)
    }

    pub fn pending_files(&self) -> std::io::Result<Vec<PathBuf>> {
        list_dir(&self.pending_dir())
    }

    /// Removes temporary files older than `max_age` that runs killed while writing a record left
    /// behind. Returns how many it removed.
    pub fn sweep_temporaries(&self, max_age: std::time::Duration) -> usize {
        let mut n = 0;
        for dir in [self.attachments(), self.pending_dir()] {
            let Ok(entries) = fs::read_dir(&dir) else {
                continue;
            };
            for e in entries.filter_map(|e| e.ok()) {
                let name = e.file_name().to_string_lossy().into_owned();
                let old = e
                    .metadata()
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.elapsed().ok())
                    .is_some_and(|age| age >= max_age);
                if name.starts_with('.')
                    && name.contains(".tmp.")
                    && old
                    && fs::remove_file(e.path()).is_ok()
                {
                    n += 1;
                }
            }
        }
        n
    }

    /// The node's blocks as the last ADD left them: the allocator reads them ahead of the
    /// lock. A guess only: empty when missing or unreadable, and checked against the node's
    /// affinities before use.
    pub fn block_hint(&self) -> Vec<ipnet::IpNet> {
        match fs::read_to_string(self.root.join("blocks")) {
            Ok(s) => s.lines().filter_map(|l| l.trim().parse().ok()).collect(),
            Err(_) => Vec::new(),
        }
    }

    /// Records the node's blocks for the next ADD's [`StateDir::block_hint`]. Not durable: a
    /// lost or stale hint costs one read.
    pub fn set_block_hint(&self, blocks: &[ipnet::IpNet]) {
        let text: String = blocks.iter().map(|b| format!("{b}\n")).collect();
        if let Err(e) = write_atomic(&self.root.join("blocks"), text.as_bytes(), false) {
            tracing::debug!(error = %e, "cannot record this node's blocks for the next ADD");
        }
    }

    /// Opens (creating) the lock file of the node's allocator calls.
    pub fn lock_file(&self) -> std::io::Result<File> {
        fs::create_dir_all(&self.root).map_err(|e| io_err(&self.root, "create directory", e))?;
        let p = self.root.join("ipam.lock");
        OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&p)
            .map_err(|e| io_err(&p, "open", e))
    }
}

/// Reads a pending release file.
pub fn read_pending(path: &Path) -> std::io::Result<Option<PendingRelease>> {
    read_json(path)
}

/// Removes a file; absent is success.
pub fn remove_file(path: &Path) -> std::io::Result<()> {
    remove_if_present(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_temporary_files_are_not_listed() {
        let dir = tempfile::tempdir().unwrap();
        let s = StateDir::new(dir.path());
        let r = AttachmentRecord {
            container_id: "c1".into(),
            ifname: "eth0".into(),
            host_veth: "cali0123456789a".into(),
            netns: "/var/run/netns/x".into(),
            namespace: Some("default".into()),
            pod: Some("web".into()),
            handle: "k8s-pod-network.c1".into(),
            ips: vec![RecordedIp {
                ip: "10.0.0.1".parse().unwrap(),
                seq: Some(7),
            }],
            ipam_type: "margay-ipam".into(),
            workload_endpoint: None,
        };
        s.write_attachment(&r).unwrap();
        fs::write(s.attachments().join(".c2:eth0.tmp.1"), b"{").unwrap();
        assert_eq!(s.read_attachment("c1", "eth0").unwrap(), Some(r.clone()));
        assert_eq!(s.attachments_all().unwrap(), vec![r]);
        s.remove_attachment("c1", "eth0").unwrap();
        s.remove_attachment("c1", "eth0").unwrap();
        assert_eq!(s.sweep_temporaries(std::time::Duration::ZERO), 1);
        assert!(fs::read_dir(s.attachments()).unwrap().next().is_none());
        assert_eq!(s.read_attachment("c1", "eth0").unwrap(), None);
    }
}
