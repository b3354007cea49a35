//! Which LLVM the nightly toolchain ships, and how bpf-linker must be built
//! to use exactly that one (pure functions; the I/O lives in `setup`).

use anyhow::{bail, Result};

/// The shared LLVM library in a rustc sysroot's `lib` directory, e.g.
/// `libLLVM.so.22.1-rust-1.97.0-nightly`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LlvmLib {
    /// The file name, `libLLVM.so.<version>`.
    pub file_name: String,
    /// Everything after `libLLVM.so.`, e.g. `22.1-rust-1.97.0-nightly`.
    pub version: String,
    /// The LLVM major version, e.g. 22.
    pub major: u32,
}

const PREFIX: &str = "libLLVM.so.";

impl LlvmLib {
    /// Parses one file name; `None` unless it is `libLLVM.so.<major>...`.
    pub fn from_file_name(name: &str) -> Option<Self> {
        let version = name.strip_prefix(PREFIX)?;
        let digits = version.len()
            - version
                .trim_start_matches(|c: char| c.is_ascii_digit())
                .len();
        let rest = &version[digits..];
        if digits == 0 || !(rest.is_empty() || rest.starts_with(['.', '-'])) {
            return None;
        }
        let major = version[..digits].parse().ok()?;
        Some(Self {
            file_name: name.to_string(),
            version: version.to_string(),
            major,
        })
    }

    /// Finds the single `libLLVM.so.<version>` among a directory's entries.
    pub fn from_listing<I, S>(names: I) -> Result<Self>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut found: Vec<Self> = names
            .into_iter()
            .filter_map(|n| Self::from_file_name(n.as_ref()))
            .collect();
        found.sort_by(|a, b| a.file_name.cmp(&b.file_name));
        match found.len() {
            0 => bail!("no {PREFIX}<version> file found"),
            1 => Ok(found.remove(0)),
            _ => bail!(
                "several {PREFIX}<version> files found, cannot tell which one rustc uses: {}",
                found
                    .iter()
                    .map(|l| l.file_name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }

    /// The bpf-linker cargo feature selecting this LLVM, e.g. `llvm-22`.
    pub fn feature(&self) -> String {
        format!("llvm-{}", self.major)
    }

    /// The symlink names the LLVM prefix's `lib/` directory needs: the
    /// unversioned link name the linker looks for, and the soname the
    /// binary records and loads at run time.
    pub fn link_names(&self) -> [&str; 2] {
        ["libLLVM.so", &self.file_name]
    }
}

/// True when `name` is an LLVM library that a prefix directory may hold
/// (used to clear links to a previous nightly's LLVM).
pub fn is_llvm_link_name(name: &str) -> bool {
    name == "libLLVM.so" || name.starts_with(PREFIX)
}

/// The version from `bpf-linker --version` output (`bpf-linker 0.13.0`).
pub fn parse_tool_version<'a>(output: &'a str, tool: &str) -> Option<&'a str> {
    output.lines().find_map(|line| {
        let mut words = line.split_whitespace();
        (words.next() == Some(tool)).then(|| words.next()).flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nightly_sysroot_listing() {
        let listing = [
            "libLLVM-22-rust-1.97.0-nightly.so",
            "librustc_driver-0123abcd.so",
            "libLLVM.so.22.1-rust-1.97.0-nightly",
            "rustlib",
        ];
        let lib = LlvmLib::from_listing(listing).unwrap();
        assert_eq!(lib.file_name, "libLLVM.so.22.1-rust-1.97.0-nightly");
        assert_eq!(lib.version, "22.1-rust-1.97.0-nightly");
        assert_eq!(lib.major, 22);
        assert_eq!(lib.feature(), "llvm-22");
        assert_eq!(
            lib.link_names(),
            ["libLLVM.so", "libLLVM.so.22.1-rust-1.97.0-nightly"]
        );
    }

    #[test]
    fn plain_versions() {
        let lib = LlvmLib::from_file_name("libLLVM.so.19.1").unwrap();
        assert_eq!((lib.major, lib.feature().as_str()), (19, "llvm-19"));
        let lib = LlvmLib::from_file_name("libLLVM.so.23").unwrap();
        assert_eq!(lib.major, 23);
        let lib = LlvmLib::from_file_name("libLLVM.so.21-rust-1.90.0-stable").unwrap();
        assert_eq!(lib.major, 21);
    }

    #[test]
    fn rejects_non_llvm_names() {
        for name in [
            "libLLVM.so",
            "libLLVM.so.",
            "libLLVM.so.x22",
            "libLLVM.so.22x",
            "libLLVM-22.so",
            "libLLVM.so.99999999999999999999",
            "",
        ] {
            assert_eq!(LlvmLib::from_file_name(name), None, "{name}");
        }
    }

    #[test]
    fn listing_errors() {
        let err = LlvmLib::from_listing(["libstd.so", "libLLVM.so"]).unwrap_err();
        assert!(err.to_string().contains("no libLLVM.so.<version>"));
        let err = LlvmLib::from_listing(["libLLVM.so.22.1-rust-x", "libLLVM.so.21.1"]).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("libLLVM.so.21.1, libLLVM.so.22.1-rust-x"),
            "{msg}"
        );
        assert!(LlvmLib::from_listing(Vec::<String>::new()).is_err());
    }

    #[test]
    fn stale_link_names() {
        assert!(is_llvm_link_name("libLLVM.so"));
        assert!(is_llvm_link_name("libLLVM.so.21.1-rust-1.90.0-nightly"));
        assert!(!is_llvm_link_name("libLLVM-22.so"));
        assert!(!is_llvm_link_name("libc.so"));
    }

    #[test]
    fn tool_version() {
        assert_eq!(
            parse_tool_version("bpf-linker 0.13.0\n", "bpf-linker"),
            Some("0.13.0")
        );
        assert_eq!(
            parse_tool_version("warning: x\nbpf-linker 0.9.15", "bpf-linker"),
            Some("0.9.15")
        );
        assert_eq!(parse_tool_version("bpf-linker\n", "bpf-linker"), None);
        assert_eq!(parse_tool_version("", "bpf-linker"), None);
        assert_eq!(parse_tool_version("other 1.0", "bpf-linker"), None);
    }
}
