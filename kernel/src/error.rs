//! Errors of the kernel layer.

use std::io;
use std::path::PathBuf;

/// Everything that can go wrong talking to the kernel.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// A netlink socket call failed (not a refusal of one request: the socket itself).
    #[error("netlink socket {op} failed: {source}; is this process allowed CAP_NET_ADMIN?")]
    Socket {
        op: &'static str,
        #[source]
        source: io::Error,
    },
    /// The kernel answered a request with an error.
    #[error("kernel refused to {what}: {source}{}", ext_suffix(.ext))]
    Refused {
        /// What we asked, e.g. `replace route 10.0.0.0/26 table 254`.
        what: String,
        /// The positive errno.
        errno: i32,
        /// The kernel's extended-ACK message, when it sent one.
        ext: Option<String>,
        #[source]
        source: io::Error,
    },
    /// A device named in a request does not exist.
    #[error("no network device named {name:?} in this namespace; create it first or fix the name")]
    NoSuchDevice { name: String },
    /// The kernel sent something we could not decode.
    #[error("cannot decode netlink message: {0}")]
    Decode(String),
    /// Entering, creating or removing a network namespace failed.
    #[error("network namespace {path}: {op} failed: {source}")]
    Netns {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: io::Error,
    },
    /// Reading or writing a sysctl failed.
    #[error("sysctl {path}: {op} failed: {source}")]
    Sysctl {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: io::Error,
    },
    /// The `nft` command failed.
    #[error(
        "nft {what} failed: {detail}; is nftables installed and the kernel's nf_tables loaded?"
    )]
    Nft { what: String, detail: String },
    /// A caller passed something that cannot be right.
    #[error("invalid argument: {0}")]
    Invalid(String),
    /// The route writer's thread is gone (it panicked or every handle was dropped).
    #[error("the route writer thread has stopped; restart the agent")]
    WriterGone,
}

impl KernelError {
    /// Whether the kernel refused because it does not support what was asked (EOPNOTSUPP:
    /// e.g. a link kind whose module this kernel does not have), rather than for a reason
    /// that may pass (permissions, a name in use, a transient failure).
    pub fn is_not_supported(&self) -> bool {
        matches!(self, KernelError::Refused { errno, .. } if *errno == nix::errno::Errno::EOPNOTSUPP as i32)
    }
}

fn ext_suffix(ext: &Option<String>) -> String {
    match ext {
        Some(m) => format!(" (kernel says: {m})"),
        None => String::new(),
    }
}

impl KernelError {
    /// The errno of a kernel refusal, if this is one.
    pub fn errno(&self) -> Option<i32> {
        match self {
            KernelError::Refused { errno, .. } => Some(*errno),
            _ => None,
        }
    }

    pub(crate) fn refused(what: impl Into<String>, errno: i32, ext: Option<String>) -> Self {
        KernelError::Refused {
            what: what.into(),
            errno,
            ext,
            source: io::Error::from_raw_os_error(errno),
        }
    }

    pub(crate) fn socket(op: &'static str, source: io::Error) -> Self {
        KernelError::Socket { op, source }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusal_names_the_request_and_the_kernel_message() {
        let e = KernelError::refused(
            "replace route 10.0.0.0/26 table 254",
            libc_enodev(),
            Some("Nexthop device is not up".into()),
        );
        let s = e.to_string();
        assert!(s.contains("replace route 10.0.0.0/26 table 254"), "{s}");
        assert!(s.contains("Nexthop device is not up"), "{s}");
        assert_eq!(e.errno(), Some(libc_enodev()));
    }

    fn libc_enodev() -> i32 {
        nix::errno::Errno::ENODEV as i32
    }
}
