//! `margay-cni install`: puts the plugins and the network configuration on the host, as the
//! chart's init container runs it, and writes the kubeconfig the plugin uses. Every file is
//! written to a temporary name in its directory, synced, and renamed into place, so the
//! container runtime never sees a half-written binary or conflist. Running it again changes
//! nothing that is already right.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// What to install and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstallConfig {
    /// Where the binaries to install are (default: the directory of this program).
    pub source_dir: PathBuf,
    /// The plugin binaries to copy.
    pub binaries: Vec<String>,
    /// The CNI bin directory, as mounted in this container.
    pub bin_dir: PathBuf,
    /// The CNI configuration directory, as mounted in this container.
    pub conf_dir: PathBuf,
    pub conflist_name: String,
    /// The conflist's JSON text.
    pub network_config: String,
}

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("{setting} is not set; {hint}")]
    Missing {
        setting: &'static str,
        hint: &'static str,
    },
    #[error("the network configuration is not a valid conflist: {0}")]
    BadConflist(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> InstallError + '_ {
    move |source| InstallError::Io {
        path: path.to_owned(),
        source,
    }
}

impl InstallConfig {
    /// Reads `MARGAY_CNI_BIN_DIR`, `MARGAY_CNI_CONF_DIR`, `MARGAY_CNI_CONFLIST_NAME`,
    /// `MARGAY_CNI_NETWORK_CONFIG`, `MARGAY_CNI_SOURCE_DIR` and `MARGAY_CNI_BINARIES`.
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<InstallConfig, InstallError> {
        let get = |k: &str| get(k).filter(|v| !v.trim().is_empty());
        let source_dir = match get("MARGAY_CNI_SOURCE_DIR") {
            Some(d) => PathBuf::from(d),
            None => std::env::current_exe()
                .ok()
                .and_then(|p| p.parent().map(Path::to_owned))
                .unwrap_or_else(|| PathBuf::from("/usr/local/bin")),
        };
        Ok(InstallConfig {
            source_dir,
            binaries: get("MARGAY_CNI_BINARIES")
                .map(|b| b.split(',').map(|s| s.trim().to_owned()).collect())
                .unwrap_or_else(|| vec!["margay".into(), "margay-ipam".into()]),
            bin_dir: get("MARGAY_CNI_BIN_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("/host/opt/cni/bin")),
            conf_dir: get("MARGAY_CNI_CONF_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("/host/etc/cni/net.d")),
            conflist_name: get("MARGAY_CNI_CONFLIST_NAME")
                .unwrap_or_else(|| "10-margay.conflist".into()),
            network_config: get("MARGAY_CNI_NETWORK_CONFIG").ok_or(InstallError::Missing {
                setting: "MARGAY_CNI_NETWORK_CONFIG",
                hint: "it carries the conflist to install (the chart sets it from a ConfigMap)",
            })?,
        })
    }
}

/// Checks that `text` is a conflist Margay can serve: JSON with a name, a supported
/// cniVersion and a non-empty plugin list whose entries have a type.
pub fn check_conflist(text: &str) -> Result<(), InstallError> {
    let bad = |m: String| Err(InstallError::BadConflist(m));
    let v: serde_json::Value = match serde_json::from_str(text) {
        Ok(v) => v,
        Err(e) => return bad(e.to_string()),
    };
    if v["name"].as_str().is_none_or(str::is_empty) {
        return bad("\"name\" is missing".into());
    }
    let version = v["cniVersion"].as_str().unwrap_or("");
    if !crate::spec::Version::parse(version).is_some_and(|v| v.is_supported()) {
        return bad(format!("cniVersion {version:?} is not one Margay supports"));
    }
    let plugins = match v["plugins"].as_array() {
        Some(p) if !p.is_empty() => p,
        _ => return bad("\"plugins\" must be a non-empty list".into()),
    };
    for (i, p) in plugins.iter().enumerate() {
        if p["type"].as_str().is_none_or(str::is_empty) {
            return bad(format!("plugins[{i}] has no type"));
        }
    }
    Ok(())
}

/// Writes `content` to `path` atomically with `mode`, unless the file already holds exactly
/// that content and mode. Returns whether it wrote.
pub fn write_atomic(path: &Path, content: &[u8], mode: u32) -> Result<bool, InstallError> {
    if let Ok(existing) = fs::read(path) {
        let same_mode = fs::metadata(path)
            .map(|m| m.permissions().mode() & 0o777 == mode)
            .unwrap_or(false);
        if existing == content && same_mode {
            return Ok(false);
        }
    }
    let dir = path.parent().unwrap_or(Path::new("."));
    let file_name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = dir.join(format!(".{file_name}.margay-tmp-{}", std::process::id()));
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)
            .map_err(io(&tmp))?;
        f.write_all(content).map_err(io(&tmp))?;
        // The mode given to open() is filtered by the umask; set it exactly.
        f.set_permissions(fs::Permissions::from_mode(mode))
            .map_err(io(&tmp))?;
        f.sync_all().map_err(io(&tmp))?;
        fs::rename(&tmp, path).map_err(io(path))?;
        // Make the rename itself durable.
        File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map(|()| true)
}

/// What an install did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct InstallReport {
    pub written: Vec<PathBuf>,
    pub unchanged: Vec<PathBuf>,
}

/// Installs the binaries and the conflist. The conflist is checked before anything is written,
/// and written last, so a runtime that sees it finds the binaries in place.
pub fn install(cfg: &InstallConfig) -> Result<InstallReport, InstallError> {
    check_conflist(&cfg.network_config)?;
    let mut report = InstallReport::default();
    for dir in [&cfg.bin_dir, &cfg.conf_dir] {
        fs::create_dir_all(dir).map_err(io(dir))?;
    }
    for bin in &cfg.binaries {
        let src = cfg.source_dir.join(bin);
        let content = fs::read(&src).map_err(io(&src))?;
        let dest = cfg.bin_dir.join(bin);
        record(
            &mut report,
            dest.clone(),
            write_atomic(&dest, &content, 0o755)?,
        );
    }
    let mut conflist = cfg.network_config.trim_end().to_owned();
    conflist.push('\n');
    let dest = cfg.conf_dir.join(&cfg.conflist_name);
    record(
        &mut report,
        dest.clone(),
        write_atomic(&dest, conflist.as_bytes(), 0o644)?,
    );
    Ok(report)
}

fn record(report: &mut InstallReport, path: PathBuf, written: bool) {
    if written {
        report.written.push(path);
    } else {
        report.unchanged.push(path);
    }
}

/// The kubeconfig the plugin uses to reach the API server with its own service account's
/// token. Written 0600: it holds a credential.
pub fn kubeconfig(server: &str, ca_pem: &[u8], token: &str) -> String {
    use base64::Engine;
    let ca = base64::engine::general_purpose::STANDARD.encode(ca_pem);
    format!(
        "# Written by margay-cni install; the node agent refreshes the token before it expires.\n\
apiVersion: v1\nkind: Config\nclusters:\n- name: local\n  cluster:\n    server: {server}\n    certificate-authority-data: {ca}\n\
users:\n- name: margay-cni\n  user:\n    token: {token}\n\
contexts:\n- name: margay-cni\n  context:\n    cluster: local\n    user: margay-cni\n\
current-context: margay-cni\n"
    )
}

/// Writes the plugin's kubeconfig into the configuration directory, 0600.
pub fn write_kubeconfig(
    conf_dir: &Path,
    server: &str,
    ca_pem: &[u8],
    token: &str,
) -> Result<bool, InstallError> {
    write_atomic(
        &conf_dir.join("margay-kubeconfig"),
        kubeconfig(server, ca_pem, token).as_bytes(),
        0o600,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFLIST: &str = r#"{"name":"k8s-pod-network","cniVersion":"1.1.0","plugins":[{"type":"margay","ipam":{"type":"margay-ipam"}}]}"#;

    fn setup() -> (tempfile::TempDir, InstallConfig) {
        let t = tempfile::tempdir().unwrap();
        let src = t.path().join("src");
        fs::create_dir_all(&src).unwrap();
        fs::write(src.join("margay"), b"plugin binary").unwrap();
        fs::write(src.join("margay-ipam"), b"ipam binary").unwrap();
        let cfg = InstallConfig {
            source_dir: src,
            binaries: vec!["margay".into(), "margay-ipam".into()],
            bin_dir: t.path().join("opt/cni/bin"),
            conf_dir: t.path().join("etc/cni/net.d"),
            conflist_name: "10-margay.conflist".into(),
            network_config: CONFLIST.into(),
        };
        (t, cfg)
    }

    fn leftovers(dir: &Path) -> Vec<String> {
        fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains("margay-tmp"))
            .collect()
    }

    #[test]
    fn installs_binaries_and_conflist_and_is_idempotent() {
        let (_t, cfg) = setup();
        let first = install(&cfg).unwrap();
        assert_eq!(first.written.len(), 3);
        let bin = cfg.bin_dir.join("margay");
        assert_eq!(fs::read(&bin).unwrap(), b"plugin binary");
        assert_eq!(
            fs::metadata(&bin).unwrap().permissions().mode() & 0o777,
            0o755
        );
        let conf = fs::read_to_string(cfg.conf_dir.join("10-margay.conflist")).unwrap();
        assert_eq!(conf.trim_end(), CONFLIST);
        let second = install(&cfg).unwrap();
        assert!(second.written.is_empty(), "{second:?}");
        assert_eq!(second.unchanged.len(), 3);
        assert!(leftovers(&cfg.bin_dir).is_empty() && leftovers(&cfg.conf_dir).is_empty());
        // A new binary replaces the old one.
        fs::write(cfg.source_dir.join("margay"), b"plugin v2").unwrap();
        let third = install(&cfg).unwrap();
        assert_eq!(third.written, vec![bin.clone()]);
        assert_eq!(fs::read(&bin).unwrap(), b"plugin v2");
    }

    #[test]
    fn a_bad_conflist_writes_nothing() {
        let (_t, mut cfg) = setup();
        for bad in [
            "{",
            r#"{"cniVersion":"1.1.0","plugins":[{"type":"margay"}]}"#,
            r#"{"name":"n","cniVersion":"9.9.9","plugins":[{"type":"margay"}]}"#,
            r#"{"name":"n","cniVersion":"1.1.0","plugins":[]}"#,
            r#"{"name":"n","cniVersion":"1.1.0","plugins":[{"ipam":{}}]}"#,
        ] {
            cfg.network_config = bad.into();
            assert!(
                matches!(install(&cfg), Err(InstallError::BadConflist(_))),
                "{bad}"
            );
            assert!(!cfg.bin_dir.exists(), "{bad}: nothing may be written");
        }
    }

    #[test]
    fn a_missing_binary_fails_with_its_path() {
        let (_t, mut cfg) = setup();
        cfg.binaries.push("margay-missing".into());
        let err = install(&cfg).unwrap_err();
        assert!(err.to_string().contains("margay-missing"), "{err}");
        // The conflist is written last, so a failed install leaves no conflist behind.
        assert!(!cfg.conf_dir.join("10-margay.conflist").exists());
    }

    #[test]
    fn the_kubeconfig_is_private_and_complete() {
        let (_t, cfg) = setup();
        fs::create_dir_all(&cfg.conf_dir).unwrap();
        assert!(write_kubeconfig(
            &cfg.conf_dir,
            "https://10.96.0.1:443",
            b"-----CA-----",
            "tok123"
        )
        .unwrap());
        let path = cfg.conf_dir.join("margay-kubeconfig");
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let text = fs::read_to_string(&path).unwrap();
        let v: serde_json::Value = serde_yaml::from_str(&text).unwrap();
        assert_eq!(
            v["clusters"][0]["cluster"]["server"],
            "https://10.96.0.1:443"
        );
        assert_eq!(v["users"][0]["user"]["token"], "tok123");
        assert!(!write_kubeconfig(
            &cfg.conf_dir,
            "https://10.96.0.1:443",
            b"-----CA-----",
            "tok123"
        )
        .unwrap());
    }

    #[test]
    fn settings_come_from_the_environment() {
        let cfg = InstallConfig::from_vars(|k| match k {
            "MARGAY_CNI_NETWORK_CONFIG" => Some(CONFLIST.into()),
            "MARGAY_CNI_BIN_DIR" => Some("/x/bin".into()),
            "MARGAY_CNI_BINARIES" => Some("margay, margay-ipam".into()),
            _ => None,
        })
        .unwrap();
        assert_eq!(cfg.bin_dir, PathBuf::from("/x/bin"));
        assert_eq!(cfg.binaries, vec!["margay", "margay-ipam"]);
        assert!(matches!(
            InstallConfig::from_vars(|_| None),
            Err(InstallError::Missing {
                setting: "MARGAY_CNI_NETWORK_CONFIG",
                ..
            })
        ));
    }
}
