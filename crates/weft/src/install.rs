//! `weft cni install`: the weft binary plus one symlink per plugin name in a CNI bin directory.

use std::path::Path;

use anyhow::{bail, Context, Result};

/// Bytes only weft's binary contains, to recognize a copy of it.
static MARKER: &str = "weft-cni-binary-marker:4f1c9a2e";

fn is_weft_binary(path: &Path) -> bool {
    std::fs::read(path).is_ok_and(|bytes| bytes.windows(MARKER.len()).any(|w| w == MARKER.as_bytes()))
}

/// Whether `path` is something weft laid down (a symlink to `weft`, or the weft binary).
fn is_weft_file(path: &Path) -> bool {
    match std::fs::read_link(path) {
        Ok(target) => target == Path::new("weft"),
        Err(_) => is_weft_binary(path),
    }
}

fn ensure_replaceable(path: &Path, force: bool) -> Result<()> {
    if path.symlink_metadata().is_ok() && !force && !is_weft_file(path) {
        bail!("{} exists and is not weft's; use --force to replace it", path.display());
    }
    Ok(())
}

pub fn install(dir: &Path, force: bool) -> Result<()> {
    // Keep the marker in the binary even though nothing else reads it.
    std::hint::black_box(MARKER);
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let binary = dir.join("weft");
    ensure_replaceable(&binary, force)?;
    // `weft` itself is the binary (the meta plugin when a runtime calls it): no link for it.
    let links: Vec<&str> = weft_plugins::PLUGIN_NAMES.iter().copied().filter(|n| *n != "weft").collect();
    for name in &links {
        ensure_replaceable(&dir.join(name), force)?;
    }
    let exe = std::env::current_exe().context("finding the running binary")?;
    let tmp = dir.join(".weft.tmp");
    std::fs::copy(&exe, &tmp).with_context(|| format!("copying {} to {}", exe.display(), tmp.display()))?;
    std::fs::rename(&tmp, &binary).with_context(|| format!("installing {}", binary.display()))?;
    outln!("installed {}", binary.display());
    for name in &links {
        let link = dir.join(name);
        if link.symlink_metadata().is_ok() {
            std::fs::remove_file(&link).with_context(|| format!("replacing {}", link.display()))?;
        }
        std::os::unix::fs::symlink("weft", &link).with_context(|| format!("linking {}", link.display()))?;
        outln!("installed {}", link.display());
    }
    Ok(())
}
