//! Writes Margay's CRDs: `margay-crdgen [DIR]` (default `charts/margay/crds`).

use std::path::PathBuf;

fn main() -> std::io::Result<()> {
    let dir = std::env::args()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("charts/margay/crds"));
    std::fs::create_dir_all(&dir)?;
    let rendered = margay_api::crd::rendered();
    // Remove generated files of kinds that no longer exist.
    for entry in std::fs::read_dir(&dir)? {
        let path = entry?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.starts_with("margay.io_") && !rendered.iter().any(|(f, _)| f == name) {
            std::fs::remove_file(&path)?;
        }
    }
    for (file, text) in rendered {
        std::fs::write(dir.join(&file), text)?;
        eprintln!("wrote {}", dir.join(&file).display());
    }
    Ok(())
}
