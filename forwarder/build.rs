use anyhow::{anyhow, Context as _};
use aya_build::{Package, Toolchain};

/// Builds the eBPF object (forwarder-ebpf, on nightly for bpfel-unknown-none)
/// into OUT_DIR, where `src/lib.rs` embeds it.
fn main() -> anyhow::Result<()> {
    let metadata =
        std::process::Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args(["metadata", "--format-version=1", "--no-deps"])
            .output()
            .context("cargo metadata")?;
    let text = String::from_utf8(metadata.stdout).context("cargo metadata output")?;
    // Find forwarder-ebpf's directory without pulling a JSON crate into the build.
    let manifest = text
        .split("\"manifest_path\":\"")
        .skip(1)
        .filter_map(|s| s.split('"').next())
        .find(|p| p.ends_with("forwarder-ebpf/Cargo.toml"))
        .ok_or_else(|| anyhow!("forwarder-ebpf package not found in cargo metadata"))?;
    let root_dir = manifest.trim_end_matches("/Cargo.toml");
    aya_build::build_ebpf(
        [Package {
            name: "forwarder-ebpf",
            root_dir,
            ..Default::default()
        }],
        Toolchain::default(),
    )
}
