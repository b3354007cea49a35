//! `cargo xtask image`: the daemon as an OCI image, written as an
//! `oci-archive` (a tar of an OCI image layout) under `target/image/`.
//!
//! - One layer holding one file: a static binary for
//!   `x86_64-unknown-linux-musl` at `/usr/local/bin/forwarder` (the eBPF
//!   object is embedded by forwarder's build script, as in every build).
//! - Reproducible: every timestamp is `SOURCE_DATE_EPOCH` (default: the
//!   commit time of `HEAD`), entries are written in a fixed order with fixed
//!   owners and modes, gzip carries no time or name, and the JSON documents
//!   are serialized from structs (fixed key order). The same binary and
//!   inputs give the same bytes, hence the same digest.
//! - Named `<name>:<tag>` (default `localhost/forwarder:<crate version>`) in
//!   both the OCI `ref.name` annotation and containerd's
//!   `io.containerd.image.name`, so `ctr images import`, `podman load` and
//!   `skopeo copy` all find it.

use std::{
    collections::BTreeMap,
    fs,
    io::Write as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{anyhow, bail, ensure, Context as _, Result};
use serde::Serialize;
use sha2::{Digest as _, Sha256};

use crate::{
    cmd::{self, say},
    tasks::Paths,
};

/// The Rust target of the image's binary: statically linked with musl.
pub const MUSL_TARGET: &str = "x86_64-unknown-linux-musl";
/// Where the binary lives in the image (and the entrypoint).
pub const BINARY_PATH: &str = "usr/local/bin/forwarder";
/// The default repository part of the image name.
pub const DEFAULT_NAME: &str = "localhost/forwarder";

const MEDIA_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const MEDIA_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const MEDIA_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const MEDIA_LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

/// What `cargo xtask image` was asked for.
pub struct ImageOptions {
    /// Repository, e.g. `localhost/forwarder` or `registry.example/forwarder`.
    pub name: String,
    /// Tag; default: the forwarder crate's version.
    pub tag: Option<String>,
    /// The archive to write; default: `target/image/forwarder-<tag>.tar`.
    pub out: Option<PathBuf>,
    /// The `org.opencontainers.image.source` label; default: the URL of the
    /// git remote `origin`, else the checkout as a `git+file://` URL.
    pub source: Option<String>,
}

/// What went into the image, besides the binary.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageMeta {
    /// `<name>:<tag>`.
    pub reference: String,
    pub version: String,
    /// The commit the image was built from (`-dirty` when the work tree had
    /// uncommitted changes).
    pub revision: String,
    /// Unix seconds used for every timestamp.
    pub source_date_epoch: u64,
    /// Where the source is (a URL).
    pub source: String,
}

/// The written archive.
#[derive(Debug)]
pub struct Built {
    pub path: PathBuf,
    /// `sha256:...` of the image manifest: the image's digest.
    pub manifest_digest: String,
    /// Bytes of the compressed layer (what a node pulls).
    pub layer_size: u64,
    pub archive_size: u64,
}

/// `cargo xtask image`: builds the static binary, then writes the archive.
pub fn image(paths: &Paths, options: &ImageOptions) -> Result<Built> {
    let tag = options
        .tag
        .clone()
        .unwrap_or_else(|| paths.forwarder_version.clone());
    let out = options
        .out
        .clone()
        .unwrap_or_else(|| default_archive(&paths.target, &tag));
    validate_reference(&options.name, &tag)?;
    // A failed build must not leave an older image for the tests to check.
    match fs::remove_file(&out) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing the old {}", out.display())),
    }
    ensure_musl_target()?;
    let binary = build_static_binary(paths)?;
    let version = paths.forwarder_version.clone();
    let meta = ImageMeta {
        reference: format!("{}:{tag}", options.name),
        version,
        revision: git_revision(&paths.workspace)?,
        source_date_epoch: source_date_epoch(&paths.workspace)?,
        source: match &options.source {
            Some(url) => url.clone(),
            None => source_url(&paths.workspace),
        },
    };
    let bytes = fs::read(&binary).with_context(|| format!("reading {}", binary.display()))?;
    check_static(&bytes).with_context(|| format!("{} is not a static binary", binary.display()))?;
    let archive = oci_archive(&bytes, &meta)?;
    if let Some(dir) = out.parent() {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    fs::write(&out, &archive.bytes).with_context(|| format!("writing {}", out.display()))?;
    let built = Built {
        path: out,
        manifest_digest: archive.manifest_digest,
        layer_size: archive.layer_size,
        archive_size: archive.bytes.len() as u64,
    };
    say!(
        "image {} ({}): {}",
        meta.reference,
        built.manifest_digest,
        built.path.display()
    );
    say!(
        "binary {:.1} MB, compressed layer {:.1} MB, archive {:.1} MB; revision {}, SOURCE_DATE_EPOCH {}",
        mb(bytes.len() as u64),
        mb(built.layer_size),
        mb(built.archive_size),
        meta.revision,
        meta.source_date_epoch
    );
    Ok(built)
}

fn mb(bytes: u64) -> f64 {
    bytes as f64 / 1e6
}

/// `target/image/forwarder-<tag>.tar`.
pub fn default_archive(target: &Path, tag: &str) -> PathBuf {
    target.join("image").join(format!("forwarder-{tag}.tar"))
}

/// The repository and tag as the OCI `ref.name` grammar and a container
/// runtime accept them (lower-case repository, docker's tag characters).
pub fn validate_reference(name: &str, tag: &str) -> Result<()> {
    let component_ok = |c: &str| {
        !c.is_empty()
            && c.starts_with(|ch: char| ch.is_ascii_alphanumeric())
            && c.ends_with(|ch: char| ch.is_ascii_alphanumeric())
            && c.chars()
                .all(|ch| ch.is_ascii_lowercase() || ch.is_ascii_digit() || "._-:".contains(ch))
    };
    if !name.split('/').all(component_ok) {
        bail!("image name {name:?}: expected lower-case components separated by '/', e.g. registry.example/forwarder");
    }
    let tag_ok = !tag.is_empty()
        && tag.len() <= 128
        && tag.starts_with(|ch: char| ch.is_ascii_alphanumeric() || ch == '_')
        && tag
            .chars()
            .all(|ch| ch.is_ascii_alphanumeric() || "._-".contains(ch));
    if !tag_ok {
        bail!(
            "image tag {tag:?}: expected up to 128 of [A-Za-z0-9_.-], not starting with '.' or '-'"
        );
    }
    Ok(())
}

fn ensure_musl_target() -> Result<()> {
    let installed = cmd::output(Command::new("rustup").args(["target", "list", "--installed"]))
        .context("rustup manages the Rust targets here; install it from https://rustup.rs")?;
    if installed.lines().any(|l| l.trim() == MUSL_TARGET) {
        say!("Rust target {MUSL_TARGET} present");
        return Ok(());
    }
    say!("installing the Rust target {MUSL_TARGET} (the image's binary is static)");
    cmd::run(Command::new("rustup").args(["target", "add", MUSL_TARGET]))
}

/// The C compiler for the musl target (ring compiles C): Debian's musl-gcc.
fn musl_cc() -> Result<PathBuf> {
    cmd::find_executable("musl-gcc").ok_or_else(|| {
        anyhow!(
            "musl-gcc not found: install Debian's musl-tools (`cargo xtask setup` as root does)"
        )
    })
}

/// `cargo build --release --target x86_64-unknown-linux-musl`, stripped.
fn build_static_binary(paths: &Paths) -> Result<PathBuf> {
    say!("building the static forwarder binary ({MUSL_TARGET}, stripped)");
    let env_target = MUSL_TARGET.replace('-', "_");
    let mut build = cmd::cargo();
    build
        .current_dir(&paths.workspace)
        .args([
            "build",
            "--release",
            "-p",
            "forwarder",
            "--bin",
            "forwarder",
        ])
        .args(["--target", MUSL_TARGET])
        .env(format!("CC_{env_target}"), musl_cc()?)
        // Only the musl artifacts: the host's build scripts and the eBPF
        // build (its own target, flags set by aya-build) are untouched.
        .env(
            format!("CARGO_TARGET_{}_RUSTFLAGS", env_target.to_uppercase()),
            "-C strip=symbols",
        );
    cmd::run(&mut build)?;
    let bin = paths
        .target
        .join(MUSL_TARGET)
        .join("release")
        .join("forwarder");
    ensure!(
        bin.is_file(),
        "the build succeeded but {} does not exist",
        bin.display()
    );
    Ok(bin)
}

fn git(workspace: &Path, args: &[&str]) -> Result<String> {
    let mut git = Command::new("git");
    git.current_dir(workspace).args(args);
    Ok(cmd::output(&mut git)?.trim().to_string())
}

/// `HEAD`'s commit, with `-dirty` if tracked files have uncommitted changes.
fn git_revision(workspace: &Path) -> Result<String> {
    let commit = git(workspace, &["rev-parse", "HEAD"])?;
    let changes = git(
        workspace,
        &["status", "--porcelain", "--untracked-files=no"],
    )?;
    Ok(if changes.is_empty() {
        commit
    } else {
        format!("{commit}-dirty")
    })
}

/// The URL of the remote `origin` without credentials, else the checkout.
fn source_url(workspace: &Path) -> String {
    match git(workspace, &["remote", "get-url", "origin"]) {
        Ok(url) if !url.is_empty() => remote_url(workspace, &strip_credentials(&url)),
        _ => {
            let url = format!("git+file://{}", workspace.display());
            crate::cmd::warning!(
                "no git remote `origin`: the source label is {url} (set it with --source URL)"
            );
            url
        }
    }
}

/// A remote as a URL: scp-like `git@host:path` becomes `ssh://git@host/path`,
/// a local path (a clone of a clone) `git+file://` with its absolute path.
pub fn remote_url(workspace: &Path, remote: &str) -> String {
    if remote.contains("://") {
        return remote.to_string();
    }
    match remote.split_once(':') {
        Some((host, path)) if host.contains('@') && !host.contains('/') => {
            format!("ssh://{host}/{}", path.trim_start_matches('/'))
        }
        _ => {
            let path = workspace.join(remote);
            let path = path.canonicalize().unwrap_or(path);
            format!("git+file://{}", path.display())
        }
    }
}

/// `https://user:token@host/x` -> `https://host/x`.
pub fn strip_credentials(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => {
            let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
            let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
            if path.is_empty() {
                format!("{scheme}://{host}")
            } else {
                format!("{scheme}://{host}/{path}")
            }
        }
        None => url.to_string(),
    }
}

/// `$SOURCE_DATE_EPOCH`, else the commit time of `HEAD`.
fn source_date_epoch(workspace: &Path) -> Result<u64> {
    if let Ok(value) = std::env::var("SOURCE_DATE_EPOCH") {
        return value
            .trim()
            .parse()
            .with_context(|| format!("SOURCE_DATE_EPOCH={value:?} is not a number of seconds"));
    }
    let time = git(workspace, &["log", "-1", "--format=%ct", "HEAD"])?;
    time.parse()
        .with_context(|| format!("`git log -1 --format=%ct` printed {time:?}"))
}

/// Refuses a binary that needs a dynamic loader or shared libraries: the
/// image has nothing but the binary.
pub fn check_static(elf: &[u8]) -> Result<()> {
    const PT_DYNAMIC: u32 = 2;
    const PT_INTERP: u32 = 3;
    const DT_NEEDED: u64 = 1;
    ensure!(
        elf.len() >= 64 && elf[..4] == *b"\x7fELF",
        "not an ELF file"
    );
    ensure!(
        elf[4] == 2 && elf[5] == 1,
        "not a 64-bit little-endian ELF file"
    );
    let u16_at = |o: usize| -> Result<u64> {
        let b = elf.get(o..o + 2).ok_or_else(|| anyhow!("truncated ELF"))?;
        Ok(u16::from_le_bytes([b[0], b[1]]).into())
    };
    let u32_at = |o: usize| -> Result<u32> {
        let b = elf.get(o..o + 4).ok_or_else(|| anyhow!("truncated ELF"))?;
        Ok(u32::from_le_bytes(b.try_into().expect("4 bytes")))
    };
    let u64_at = |o: usize| -> Result<u64> {
        let b = elf.get(o..o + 8).ok_or_else(|| anyhow!("truncated ELF"))?;
        Ok(u64::from_le_bytes(b.try_into().expect("8 bytes")))
    };
    let phoff = usize::try_from(u64_at(0x20)?)?;
    let phentsize = usize::try_from(u16_at(0x36)?)?;
    let phnum = usize::try_from(u16_at(0x38)?)?;
    for i in 0..phnum {
        let ph = phoff + i * phentsize;
        match u32_at(ph)? {
            PT_INTERP => bail!("it has a program interpreter (dynamically linked)"),
            PT_DYNAMIC => {
                let offset = usize::try_from(u64_at(ph + 8)?)?;
                let size = usize::try_from(u64_at(ph + 32)?)?;
                for entry in (offset..offset + size).step_by(16) {
                    if u64_at(entry)? == DT_NEEDED {
                        bail!("it needs shared libraries (DT_NEEDED)");
                    }
                }
            }
            _ => {}
        }
    }
    Ok(())
}

// ---- the OCI documents (field order is the serialization order) ----

#[derive(Serialize)]
struct Descriptor {
    #[serde(rename = "mediaType")]
    media_type: &'static str,
    digest: String,
    size: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    platform: Option<Platform>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    annotations: BTreeMap<&'static str, String>,
}

#[derive(Serialize)]
struct Platform {
    architecture: &'static str,
    os: &'static str,
}

#[derive(Serialize)]
struct ImageConfig {
    created: String,
    architecture: &'static str,
    os: &'static str,
    config: RuntimeConfig,
    rootfs: RootFs,
    history: Vec<History>,
}

#[derive(Serialize)]
struct RuntimeConfig {
    #[serde(rename = "Env")]
    env: Vec<String>,
    #[serde(rename = "Entrypoint")]
    entrypoint: Vec<String>,
    #[serde(rename = "WorkingDir")]
    working_dir: &'static str,
    #[serde(rename = "Labels")]
    labels: BTreeMap<&'static str, String>,
}

#[derive(Serialize)]
struct RootFs {
    #[serde(rename = "type")]
    kind: &'static str,
    diff_ids: Vec<String>,
}

#[derive(Serialize)]
struct History {
    created: String,
    created_by: &'static str,
}

#[derive(Serialize)]
struct Manifest {
    #[serde(rename = "schemaVersion")]
    schema_version: u32,
    #[serde(rename = "mediaType")]
    media_type: &'static str,
    config: Descriptor,
    layers: Vec<Descriptor>,
    annotations: BTreeMap<&'static str, String>,
}

#[derive(Serialize)]
struct Index {
    #[serde(rename = "schemaVersion")]
    schema_version: u32,
    #[serde(rename = "mediaType")]
    media_type: &'static str,
    manifests: Vec<Descriptor>,
}

#[derive(Serialize)]
struct Layout {
    #[serde(rename = "imageLayoutVersion")]
    image_layout_version: &'static str,
}

/// An oci-archive in memory.
pub struct Archive {
    pub bytes: Vec<u8>,
    pub manifest_digest: String,
    pub layer_size: u64,
}

fn sha256(data: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(data))
}

/// RFC 3339 UTC for Unix seconds (civil-from-days, proleptic Gregorian).
pub fn rfc3339(unix: u64) -> String {
    let days = (unix / 86_400) as i64;
    let secs = unix % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

/// A tar header with fixed owner, times and names.
fn header(kind: tar::EntryType, mode: u32, size: u64, mtime: u64) -> tar::Header {
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size);
    h.set_mtime(mtime);
    h.set_uid(0);
    h.set_gid(0);
    h
}

fn append_dir(tar: &mut tar::Builder<Vec<u8>>, path: &str, mtime: u64) -> Result<()> {
    let mut h = header(tar::EntryType::Directory, 0o755, 0, mtime);
    tar.append_data(&mut h, path, std::io::empty())
        .with_context(|| format!("adding {path}"))
}

fn append_file(
    tar: &mut tar::Builder<Vec<u8>>,
    path: &str,
    mode: u32,
    data: &[u8],
    mtime: u64,
) -> Result<()> {
    let mut h = header(tar::EntryType::Regular, mode, data.len() as u64, mtime);
    tar.append_data(&mut h, path, data)
        .with_context(|| format!("adding {path}"))
}

/// The layer: `/usr/local/bin/forwarder` and its directories.
fn layer_tar(binary: &[u8], mtime: u64) -> Result<Vec<u8>> {
    let mut tar = tar::Builder::new(Vec::new());
    for dir in ["usr/", "usr/local/", "usr/local/bin/"] {
        append_dir(&mut tar, dir, mtime)?;
    }
    append_file(&mut tar, BINARY_PATH, 0o755, binary, mtime)?;
    tar.into_inner().context("finishing the layer")
}

fn gzip(data: &[u8]) -> Result<Vec<u8>> {
    // No file name and mtime 0 in the gzip header: the same bytes every time.
    let mut gz = flate2::GzBuilder::new()
        .mtime(0)
        .write(Vec::new(), flate2::Compression::best());
    gz.write_all(data).context("compressing the layer")?;
    gz.finish().context("compressing the layer")
}

fn json<T: Serialize>(value: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(value).context("serializing an OCI document")
}

/// The OCI labels, on the image config and as manifest annotations.
fn labels(meta: &ImageMeta) -> BTreeMap<&'static str, String> {
    BTreeMap::from([
        (
            "org.opencontainers.image.created",
            rfc3339(meta.source_date_epoch),
        ),
        (
            "org.opencontainers.image.description",
            "eBPF/XDP NodePort accelerator for Kubernetes nodes".to_string(),
        ),
        (
            "org.opencontainers.image.licenses",
            "MIT OR Apache-2.0".to_string(),
        ),
        ("org.opencontainers.image.revision", meta.revision.clone()),
        ("org.opencontainers.image.source", meta.source.clone()),
        ("org.opencontainers.image.title", "forwarder".to_string()),
        ("org.opencontainers.image.version", meta.version.clone()),
    ])
}

/// The whole image as an oci-archive.
pub fn oci_archive(binary: &[u8], meta: &ImageMeta) -> Result<Archive> {
    let epoch = meta.source_date_epoch;
    let created = rfc3339(epoch);
    let layer = layer_tar(binary, epoch)?;
    let layer_gz = gzip(&layer)?;
    let config = json(&ImageConfig {
        created: created.clone(),
        architecture: "amd64",
        os: "linux",
        config: RuntimeConfig {
            env: vec!["PATH=/usr/local/bin".into()],
            entrypoint: vec![format!("/{BINARY_PATH}")],
            working_dir: "/",
            labels: labels(meta),
        },
        rootfs: RootFs {
            kind: "layers",
            diff_ids: vec![sha256(&layer)],
        },
        history: vec![History {
            created,
            created_by: "cargo xtask image",
        }],
    })?;
    let descriptor = |media_type, data: &[u8]| Descriptor {
        media_type,
        digest: sha256(data),
        size: data.len() as u64,
        platform: None,
        annotations: BTreeMap::new(),
    };
    let manifest = json(&Manifest {
        schema_version: 2,
        media_type: MEDIA_MANIFEST,
        config: descriptor(MEDIA_CONFIG, &config),
        layers: vec![descriptor(MEDIA_LAYER, &layer_gz)],
        annotations: labels(meta),
    })?;
    let manifest_digest = sha256(&manifest);
    let index = json(&Index {
        schema_version: 2,
        media_type: MEDIA_INDEX,
        manifests: vec![Descriptor {
            platform: Some(Platform {
                architecture: "amd64",
                os: "linux",
            }),
            annotations: BTreeMap::from([
                ("io.containerd.image.name", meta.reference.clone()),
                ("org.opencontainers.image.ref.name", meta.reference.clone()),
            ]),
            ..descriptor(MEDIA_MANIFEST, &manifest)
        }],
    })?;
    let layout = json(&Layout {
        image_layout_version: "1.0.0",
    })?;

    let mut blobs: Vec<(String, &[u8])> = vec![
        (sha256(&config), &config),
        (sha256(&layer_gz), &layer_gz),
        (manifest_digest.clone(), &manifest),
    ];
    blobs.sort();
    blobs.dedup_by(|a, b| a.0 == b.0);
    let mut tar = tar::Builder::new(Vec::new());
    append_dir(&mut tar, "blobs/", epoch)?;
    append_dir(&mut tar, "blobs/sha256/", epoch)?;
    for (digest, data) in &blobs {
        let hex = digest.trim_start_matches("sha256:");
        append_file(&mut tar, &format!("blobs/sha256/{hex}"), 0o644, data, epoch)?;
    }
    append_file(&mut tar, "index.json", 0o644, &index, epoch)?;
    append_file(&mut tar, "oci-layout", 0o644, &layout, epoch)?;
    Ok(Archive {
        bytes: tar.into_inner().context("finishing the archive")?,
        manifest_digest,
        layer_size: layer_gz.len() as u64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(epoch: u64) -> ImageMeta {
        ImageMeta {
            reference: "localhost/forwarder:0.1.0".into(),
            version: "0.1.0".into(),
            revision: "0123456789abcdef0123456789abcdef01234567".into(),
            source_date_epoch: epoch,
            source: "https://git.example/forwarder".into(),
        }
    }

    /// (path, mode, mtime, uid, size) of every entry, and the file contents.
    fn entries(tar_bytes: &[u8]) -> Vec<(String, u32, u64, u64, Vec<u8>)> {
        let mut archive = tar::Archive::new(tar_bytes);
        archive
            .entries()
            .unwrap()
            .map(|e| {
                let mut e = e.unwrap();
                let path = e.path().unwrap().display().to_string();
                let h = e.header().clone();
                let mut data = Vec::new();
                std::io::Read::read_to_end(&mut e, &mut data).unwrap();
                (
                    path,
                    h.mode().unwrap(),
                    h.mtime().unwrap(),
                    h.uid().unwrap(),
                    data,
                )
            })
            .collect()
    }

    #[test]
    fn the_same_inputs_give_the_same_bytes_and_another_time_another_digest() {
        let binary = b"\x7fELF not really, but bytes".repeat(1000);
        let a = oci_archive(&binary, &meta(1_700_000_000)).unwrap();
        let b = oci_archive(&binary, &meta(1_700_000_000)).unwrap();
        assert_eq!(a.bytes, b.bytes);
        assert_eq!(a.manifest_digest, b.manifest_digest);
        let c = oci_archive(&binary, &meta(1_700_000_001)).unwrap();
        assert_ne!(a.manifest_digest, c.manifest_digest);
        let mut other = binary.clone();
        other[5] ^= 1;
        assert_ne!(
            a.manifest_digest,
            oci_archive(&other, &meta(1_700_000_000))
                .unwrap()
                .manifest_digest
        );
    }

    #[test]
    fn the_archive_is_an_oci_layout_whose_blobs_match_their_digests() {
        let binary = vec![7u8; 4096];
        let archive = oci_archive(&binary, &meta(1_700_000_000)).unwrap();
        let entries = entries(&archive.bytes);
        let names: Vec<&str> = entries.iter().map(|e| e.0.as_str()).collect();
        assert_eq!(names[..2], ["blobs/", "blobs/sha256/"]);
        assert_eq!(names[names.len() - 2..], ["index.json", "oci-layout"]);
        for (path, mode, mtime, uid, data) in &entries {
            assert_eq!(*mtime, 1_700_000_000, "{path}");
            assert_eq!(*uid, 0, "{path}");
            if let Some(hex) = path.strip_prefix("blobs/sha256/").filter(|h| !h.is_empty()) {
                assert_eq!(sha256(data), format!("sha256:{hex}"));
                assert_eq!(*mode, 0o644);
            }
        }
        let blob = |digest: &str| -> Vec<u8> {
            let path = format!("blobs/sha256/{}", digest.trim_start_matches("sha256:"));
            entries.iter().find(|e| e.0 == path).expect(&path).4.clone()
        };
        let index: serde_json::Value =
            serde_json::from_slice(&entries.iter().find(|e| e.0 == "index.json").unwrap().4)
                .unwrap();
        let m = &index["manifests"][0];
        assert_eq!(m["digest"], archive.manifest_digest.as_str());
        assert_eq!(
            m["annotations"]["org.opencontainers.image.ref.name"],
            "localhost/forwarder:0.1.0"
        );
        let manifest: serde_json::Value =
            serde_json::from_slice(&blob(&archive.manifest_digest)).unwrap();
        let config: serde_json::Value =
            serde_json::from_slice(&blob(manifest["config"]["digest"].as_str().unwrap())).unwrap();
        assert_eq!(
            config["config"]["Entrypoint"][0],
            "/usr/local/bin/forwarder"
        );
        assert_eq!(config["created"], "2023-11-14T22:13:20Z");
        assert_eq!(
            config["config"]["Labels"]["org.opencontainers.image.version"],
            "0.1.0"
        );
        // The layer holds the binary, and the config names the layer's
        // uncompressed digest.
        let gz = blob(manifest["layers"][0]["digest"].as_str().unwrap());
        let mut layer = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&gz[..]), &mut layer).unwrap();
        assert_eq!(config["rootfs"]["diff_ids"][0], sha256(&layer).as_str());
        let files = entries_of_layer(&layer);
        assert_eq!(
            files,
            [
                ("usr/".to_string(), 0o755, 0),
                ("usr/local/".to_string(), 0o755, 0),
                ("usr/local/bin/".to_string(), 0o755, 0),
                ("usr/local/bin/forwarder".to_string(), 0o755, 4096),
            ]
        );
    }

    fn entries_of_layer(layer: &[u8]) -> Vec<(String, u32, usize)> {
        entries(layer)
            .into_iter()
            .map(|(p, mode, _, _, data)| (p, mode, data.len()))
            .collect()
    }

    #[test]
    fn rfc3339_dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(rfc3339(4_102_444_799), "2099-12-31T23:59:59Z");
    }

    #[test]
    fn a_dynamic_binary_is_refused() {
        // xtask itself is linked against glibc.
        let me = fs::read(std::env::current_exe().unwrap()).unwrap();
        let err = check_static(&me).unwrap_err().to_string();
        assert!(
            err.contains("interpreter") || err.contains("DT_NEEDED"),
            "{err}"
        );
        assert!(
            check_static(b"#!/bin/sh\necho not elf, but long enough to have a header......\n")
                .is_err()
        );
    }

    #[test]
    fn remotes_become_urls() {
        let ws = Path::new("/nonexistent/checkout");
        assert_eq!(
            remote_url(ws, "https://git.example/team/forwarder.git"),
            "https://git.example/team/forwarder.git"
        );
        assert_eq!(
            remote_url(ws, "git@git.example:team/forwarder.git"),
            "ssh://git@git.example/team/forwarder.git"
        );
        assert_eq!(
            remote_url(ws, "/srv/git/forwarder"),
            "git+file:///srv/git/forwarder"
        );
        assert_eq!(
            remote_url(ws, "../upstream"),
            "git+file:///nonexistent/checkout/../upstream"
        );
    }

    #[test]
    fn source_urls_lose_their_credentials() {
        assert_eq!(
            strip_credentials("https://user:token@git.example/team/forwarder.git"),
            "https://git.example/team/forwarder.git"
        );
        assert_eq!(
            strip_credentials("https://git.example"),
            "https://git.example"
        );
        assert_eq!(
            strip_credentials("git@git.example:team/forwarder.git"),
            "git@git.example:team/forwarder.git"
        );
    }

    #[test]
    fn references() {
        assert!(validate_reference("localhost/forwarder", "0.1.0").is_ok());
        assert!(validate_reference("registry.example:5000/team/forwarder", "v1_2-rc.3").is_ok());
        assert!(validate_reference("Forwarder", "0.1.0").is_err());
        assert!(validate_reference("localhost//forwarder", "0.1.0").is_err());
        assert!(validate_reference("localhost/forwarder", "-x").is_err());
        assert!(validate_reference("localhost/forwarder", "a:b").is_err());
        assert!(validate_reference("localhost/forwarder", "").is_err());
    }
}
