//! Reading Service and EndpointSlice manifests from files (`--manifests`).
//!
//! Input is what `kubectl get -o yaml` / `-o json` prints: multi-document
//! YAML, JSON, and `kind: List` wrappers. A bad document must not hide the
//! good ones, so parsing never fails as a whole: each document that cannot
//! be used becomes a [`ManifestProblem`] (with file and line) and the rest
//! still loads. Only an unusable top-level path is an error.
use std::{
    collections::hash_map::DefaultHasher,
    fmt, fs,
    hash::{Hash, Hasher},
    io,
    path::{Path, PathBuf},
};

use k8s_openapi::api::{
    core::v1::{Pod, Service},
    discovery::v1::EndpointSlice,
    networking::v1::NetworkPolicy,
};
use serde::de::DeserializeOwned;
use serde_yaml::Value;

/// `kind: List` may nest (it never does in kubectl output); bound it anyway
/// so hostile input cannot recurse deeply.
const MAX_LIST_DEPTH: usize = 8;

/// File name endings taken from a directory.
const MANIFEST_EXTENSIONS: &[&str] = &["yaml", "yml", "json"];

/// Everything usable found under a manifest path.
#[derive(Clone, Debug, Default)]
pub struct ManifestSet {
    pub services: Vec<Service>,
    pub endpoint_slices: Vec<EndpointSlice>,
    /// Pods and NetworkPolicies: which local endpoints policy guards.
    pub pods: Vec<Pod>,
    pub network_policies: Vec<NetworkPolicy>,
    /// The namespaces of NetworkPolicy documents that could not be read
    /// (`None`: not even that): they police their whole namespace.
    pub unreadable_policies: Vec<Option<String>>,
    /// Documents (or List items) that could not be used.
    pub problems: Vec<ManifestProblem>,
    /// Objects of kinds we do not need (Deployments, ConfigMaps, ...), counted so
    /// the operator can tell "nothing matched" from "nothing was read".
    pub ignored_documents: usize,
}

impl ManifestSet {
    /// The Pods and NetworkPolicies read, for [`crate::policy::Policing::of`].
    pub fn policy_objects(&self) -> crate::policy::PolicyObjects<'_> {
        crate::policy::PolicyObjects {
            pods: &self.pods,
            policies: &self.network_policies,
            unreadable: &self.unreadable_policies,
        }
    }

    /// Appends another set (e.g. the next file of a directory).
    pub fn extend(&mut self, other: ManifestSet) {
        self.services.extend(other.services);
        self.endpoint_slices.extend(other.endpoint_slices);
        self.pods.extend(other.pods);
        self.network_policies.extend(other.network_policies);
        self.unreadable_policies.extend(other.unreadable_policies);
        self.problems.extend(other.problems);
        self.ignored_documents += other.ignored_documents;
    }
}

/// One document (or List item) that was skipped, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ManifestProblem {
    pub file: PathBuf,
    /// 1-based line in `file`, when known.
    pub line: Option<usize>,
    pub message: String,
}

impl fmt::Display for ManifestProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "{}:{}: {}", self.file.display(), line, self.message),
            None => write!(f, "{}: {}", self.file.display(), self.message),
        }
    }
}

/// The manifest path itself cannot be used (bad documents are not errors).
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("cannot access manifest path {}: {source}", path.display())]
    Access { path: PathBuf, source: io::Error },
    #[error("cannot list manifest directory {}: {source}", path.display())]
    ListDir { path: PathBuf, source: io::Error },
    #[error("cannot read manifest file {}: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
}

/// Loads a manifest file, or every `*.yaml`/`*.yml`/`*.json` file of a
/// directory (not recursive, sorted by name, hidden files skipped).
///
/// Files inside a directory that cannot be read become problems, so one bad
/// file does not stop the others.
pub fn load_path(path: &Path) -> Result<ManifestSet, ManifestError> {
    let meta = fs::metadata(path).map_err(|source| ManifestError::Access {
        path: path.to_owned(),
        source,
    })?;
    if !meta.is_dir() {
        let bytes = fs::read(path).map_err(|source| ManifestError::Read {
            path: path.to_owned(),
            source,
        })?;
        return Ok(parse_bytes(path, &bytes));
    }
    let files = list_manifest_files(path).map_err(|source| ManifestError::ListDir {
        path: path.to_owned(),
        source,
    })?;
    let mut set = ManifestSet::default();
    for file in files {
        match fs::read(&file) {
            Ok(bytes) => set.extend(parse_bytes(&file, &bytes)),
            Err(err) => set.problems.push(ManifestProblem {
                file,
                line: None,
                message: format!("cannot read file: {err}"),
            }),
        }
    }
    Ok(set)
}

/// Cheap change detection for reloads: a hash of the names, sizes, mtimes
/// and inodes of the files [`load_path`] would read. Nothing is parsed.
///
/// Inode and ctime are included because ConfigMap volumes and editors
/// replace files by rename, which can keep size and mtime. The value is
/// only meaningful within one process (compare, do not store).
pub fn fingerprint(path: &Path) -> io::Result<u64> {
    let mut hasher = DefaultHasher::new();
    let meta = fs::metadata(path)?;
    if meta.is_dir() {
        for file in list_manifest_files(path)? {
            file.hash(&mut hasher);
            // A file vanishing between listing and stat is a change, not
            // an error: the next poll sees the settled state.
            match fs::metadata(&file) {
                Ok(meta) => hash_metadata(&meta, &mut hasher),
                Err(err) => err.kind().hash(&mut hasher),
            }
        }
    } else {
        path.hash(&mut hasher);
        hash_metadata(&meta, &mut hasher);
    }
    Ok(hasher.finish())
}

fn hash_metadata(meta: &fs::Metadata, hasher: &mut DefaultHasher) {
    use std::os::unix::fs::MetadataExt;
    meta.len().hash(hasher);
    meta.mtime().hash(hasher);
    meta.mtime_nsec().hash(hasher);
    meta.ctime().hash(hasher);
    meta.ctime_nsec().hash(hasher);
    meta.ino().hash(hasher);
    meta.dev().hash(hasher);
}

/// The files of `dir` that are manifests, sorted by name.
///
/// Hidden names are skipped: besides dotfiles this skips the `..data` and
/// `..2024_...` entries of ConfigMap volumes, whose real files appear as
/// symlinks at the top level (followed here).
fn list_manifest_files(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if name.starts_with('.') {
            continue;
        }
        let Some((_, ext)) = name.rsplit_once('.') else {
            continue;
        };
        if !MANIFEST_EXTENSIONS
            .iter()
            .any(|want| ext.eq_ignore_ascii_case(want))
        {
            continue;
        }
        let path = entry.path();
        // fs::metadata follows symlinks; dangling links and subdirectories
        // named like manifests are left out.
        if fs::metadata(&path).map(|m| m.is_file()).unwrap_or(false) {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

fn parse_bytes(file: &Path, bytes: &[u8]) -> ManifestSet {
    match std::str::from_utf8(bytes) {
        Ok(text) => parse_str(file, text),
        Err(err) => {
            let line = bytes[..err.valid_up_to()]
                .iter()
                .filter(|&&b| b == b'\n')
                .count()
                + 1;
            let mut set = ManifestSet::default();
            set.problems.push(ManifestProblem {
                file: file.to_owned(),
                line: Some(line),
                message: format!("not UTF-8 text: {err}"),
            });
            set
        }
    }
}

/// Parses the text of one file. `file` names the file in problems, and
/// decides the syntax: `*.json` is read as a JSON stream, anything else as
/// (multi-document) YAML.
pub fn parse_str(file: &Path, text: &str) -> ManifestSet {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let is_json = file
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("json"));
    let mut parser = Parser {
        file,
        set: ManifestSet::default(),
    };
    if is_json {
        parser.json_stream(text);
    } else {
        for doc in split_yaml_documents(text) {
            parser.yaml_document(&doc);
        }
    }
    parser.set
}

/// One YAML document of a multi-document file.
#[derive(Debug, PartialEq, Eq)]
struct YamlDoc<'a> {
    text: &'a str,
    /// 1-based line of `text`'s first line within the file.
    first_line: usize,
    /// 1-based line of the first line with content (for messages).
    content_line: usize,
    has_content: bool,
}

/// Splits a YAML stream into documents at `---` / `...` markers.
///
/// Done textually (rather than with serde_yaml's document iterator) so that
/// a syntax error in one document does not lose the documents after it:
/// libyaml stops at the first error. This is exact: YAML forbids a line
/// starting with `---` or `...` followed by a blank inside any content.
fn split_yaml_documents(text: &str) -> Vec<YamlDoc<'_>> {
    let mut docs = Vec::new();
    let mut start = 0; // byte offset of the current document
    let mut first_line = 1;
    let mut content_line = 1;
    let mut has_content = false;
    // The current document already has a `---` (another one starts a new document).
    let mut has_start_marker = false;
    let mut offset = 0;
    for (index, line) in text.split_inclusive('\n').enumerate() {
        let line_no = index + 1;
        let marker = |m: &str| {
            line.strip_prefix(m)
                .map(|rest| rest.is_empty() || rest.starts_with([' ', '\t', '\r', '\n']))
                .unwrap_or(false)
        };
        if marker("---") {
            if has_content || has_start_marker {
                docs.push(YamlDoc {
                    text: &text[start..offset],
                    first_line,
                    content_line,
                    has_content,
                });
                start = offset;
                first_line = line_no;
                has_content = false;
            }
            has_start_marker = true;
            // `--- {kind: Service, ...}` has content on the marker line.
            let rest = line[3..].trim_start();
            if !has_content && !rest.is_empty() && !rest.starts_with('#') {
                has_content = true;
                content_line = line_no;
            }
            offset += line.len();
        } else if marker("...") {
            // The end marker closes the document; directives may follow.
            offset += line.len();
            docs.push(YamlDoc {
                text: &text[start..offset],
                first_line,
                content_line,
                has_content,
            });
            start = offset;
            first_line = line_no + 1;
            has_content = false;
            has_start_marker = false;
        } else {
            let trimmed = line.trim_start();
            let blank = trimmed.is_empty() || trimmed.starts_with('#');
            // `%YAML`/`%TAG` directives belong to the preamble of the next document.
            let directive = line.starts_with('%');
            if !has_content && !blank && !directive {
                has_content = true;
                content_line = line_no;
            }
            offset += line.len();
        }
    }
    if start < text.len() {
        docs.push(YamlDoc {
            text: &text[start..],
            first_line,
            content_line,
            has_content,
        });
    }
    docs.retain(|d| d.has_content);
    docs
}

/// How a document's text can be re-read into a typed object with precise
/// error positions.
enum Source<'a> {
    Yaml(&'a YamlDoc<'a>),
    Json {
        text: &'a str,
        first_line: usize,
    },
    /// An item of a List: only the List's own position is known.
    ListItem {
        line: usize,
        path: String,
    },
}

impl Source<'_> {
    fn line(&self) -> usize {
        match self {
            Source::Yaml(doc) => doc.content_line,
            Source::Json { text, first_line } => {
                // Skip the whitespace before the value.
                let leading = text.len() - text.trim_start().len();
                first_line + text[..leading].matches('\n').count()
            }
            Source::ListItem { line, .. } => *line,
        }
    }

    fn prefix(&self) -> String {
        match self {
            Source::ListItem { path, .. } => format!("{path}: "),
            _ => String::new(),
        }
    }
}

/// What kind of object a document is, judged from `apiVersion` and `kind`.
enum Kind {
    Empty,
    Service,
    EndpointSlice,
    Pod,
    NetworkPolicy,
    /// `kind: List` (items carry their own kind) or a typed list such as
    /// `ServiceList` from the raw API (items carry no kind).
    List(Option<ItemKind>),
    Ignored,
    Bad(String),
    /// A NetworkPolicy that cannot be used.
    BadPolicy(String),
}

impl Kind {
    fn message(self) -> String {
        match self {
            Kind::Bad(m) | Kind::BadPolicy(m) => m,
            _ => String::new(),
        }
    }
}

#[derive(Clone, Copy)]
enum ItemKind {
    Service,
    EndpointSlice,
    Pod,
    NetworkPolicy,
}

fn classify(value: &Value) -> Kind {
    let map = match value {
        Value::Null => return Kind::Empty,
        Value::Mapping(map) => map,
        _ => {
            return Kind::Bad(
                "not a Kubernetes object (expected a mapping with apiVersion and kind)".into(),
            )
        }
    };
    let Some(kind) = map.get("kind").and_then(Value::as_str) else {
        return Kind::Bad("not a Kubernetes object: no `kind`".into());
    };
    let api_version = map.get("apiVersion").and_then(Value::as_str).unwrap_or("");
    let wrong_version = |want: &str| {
        Kind::Bad(format!(
            "{kind} with apiVersion {api_version:?} is not supported (expected {want})"
        ))
    };
    match kind {
        "List" => Kind::List(None),
        "Service" if api_version == "v1" => Kind::Service,
        "Service" => wrong_version("v1"),
        "ServiceList" if api_version == "v1" => Kind::List(Some(ItemKind::Service)),
        "ServiceList" => wrong_version("v1"),
        "EndpointSlice" if api_version == "discovery.k8s.io/v1" => Kind::EndpointSlice,
        "EndpointSlice" => wrong_version("discovery.k8s.io/v1"),
        "EndpointSliceList" if api_version == "discovery.k8s.io/v1" => {
            Kind::List(Some(ItemKind::EndpointSlice))
        }
        "EndpointSliceList" => wrong_version("discovery.k8s.io/v1"),
        "Pod" if api_version == "v1" => Kind::Pod,
        "Pod" => wrong_version("v1"),
        "PodList" if api_version == "v1" => Kind::List(Some(ItemKind::Pod)),
        "PodList" => wrong_version("v1"),
        "NetworkPolicy" if api_version == "networking.k8s.io/v1" => Kind::NetworkPolicy,
        // Unread, it still polices its namespace (see `unreadable_policies`).
        "NetworkPolicy" => Kind::BadPolicy(wrong_version("networking.k8s.io/v1").message()),
        "NetworkPolicyList" if api_version == "networking.k8s.io/v1" => {
            Kind::List(Some(ItemKind::NetworkPolicy))
        }
        "NetworkPolicyList" => wrong_version("networking.k8s.io/v1"),
        _ => Kind::Ignored,
    }
}

struct Parser<'a> {
    file: &'a Path,
    set: ManifestSet,
}

impl Parser<'_> {
    fn problem(&mut self, line: Option<usize>, message: String) {
        self.set.problems.push(ManifestProblem {
            file: self.file.to_owned(),
            line,
            message,
        });
    }

    fn yaml_document(&mut self, doc: &YamlDoc<'_>) {
        match serde_yaml::from_str::<Value>(doc.text) {
            Ok(value) => self.object(&value, &Source::Yaml(doc), 0),
            Err(err) => {
                let (line, message) = yaml_error(&err, doc.first_line);
                self.problem(line.or(Some(doc.content_line)), message);
            }
        }
    }

    fn json_stream(&mut self, text: &str) {
        let mut stream = serde_json::Deserializer::from_str(text).into_iter::<serde_json::Value>();
        loop {
            let start = stream.byte_offset();
            match stream.next() {
                None => break,
                Some(Ok(json)) => {
                    let end = stream.byte_offset();
                    let first_line = 1 + text[..start].matches('\n').count();
                    let source = Source::Json {
                        text: &text[start..end],
                        first_line,
                    };
                    // JSON is a subset of YAML's data model; this cannot
                    // fail for values serde_json produced.
                    match serde_yaml::to_value(&json) {
                        Ok(value) => self.object(&value, &source, 0),
                        Err(err) => self.problem(Some(source.line()), err.to_string()),
                    }
                }
                Some(Err(err)) => {
                    // Positions of a stream error are already file-absolute.
                    let message = strip_json_location(&err);
                    self.problem(Some(err.line()).filter(|&l| l > 0), message);
                    // JSON has no document markers to resynchronise on.
                    break;
                }
            }
        }
    }

    fn object(&mut self, value: &Value, source: &Source<'_>, depth: usize) {
        match classify(value) {
            Kind::Empty => {}
            Kind::Ignored => self.set.ignored_documents += 1,
            Kind::Bad(message) => {
                let message = format!("{}{message}", source.prefix());
                self.problem(Some(source.line()), message);
            }
            Kind::Service => {
                if let Some(service) = self.typed::<Service>(value, source) {
                    self.set.services.push(service);
                }
            }
            Kind::EndpointSlice => {
                if let Some(slice) = self.typed::<EndpointSlice>(value, source) {
                    self.set.endpoint_slices.push(slice);
                }
            }
            Kind::Pod => self.item(value, source, ItemKind::Pod),
            Kind::NetworkPolicy => self.item(value, source, ItemKind::NetworkPolicy),
            Kind::BadPolicy(message) => {
                let message = format!("{}{message}", source.prefix());
                self.problem(Some(source.line()), message);
                self.set.unreadable_policies.push(policy_namespace(value));
            }
            Kind::List(item_kind) => self.list(value, source, item_kind, depth),
        }
    }

    fn list(
        &mut self,
        value: &Value,
        source: &Source<'_>,
        item_kind: Option<ItemKind>,
        depth: usize,
    ) {
        let line = source.line();
        let prefix = source.prefix();
        if depth >= MAX_LIST_DEPTH {
            self.problem(Some(line), format!("{prefix}Lists nested too deeply"));
            return;
        }
        let items = match value.get("items") {
            None | Some(Value::Null) => return,
            Some(Value::Sequence(items)) => items,
            Some(_) => {
                self.problem(Some(line), format!("{prefix}`items` is not a list"));
                return;
            }
        };
        let parent = match source {
            Source::ListItem { path, .. } => format!("{path}."),
            _ => String::new(),
        };
        for (index, item) in items.iter().enumerate() {
            let item_source = Source::ListItem {
                line,
                path: format!("{parent}items[{index}]"),
            };
            match item_kind {
                // Typed lists: items have no kind of their own.
                Some(ItemKind::Service) => {
                    if let Some(service) = self.typed::<Service>(item, &item_source) {
                        self.set.services.push(service);
                    }
                }
                Some(ItemKind::EndpointSlice) => {
                    if let Some(slice) = self.typed::<EndpointSlice>(item, &item_source) {
                        self.set.endpoint_slices.push(slice);
                    }
                }
                Some(kind @ (ItemKind::Pod | ItemKind::NetworkPolicy)) => {
                    self.item(item, &item_source, kind)
                }
                None => self.object(item, &item_source, depth + 1),
            }
        }
    }

    /// A Pod or NetworkPolicy; a NetworkPolicy that does not deserialize
    /// is still counted against its namespace.
    fn item(&mut self, value: &Value, source: &Source<'_>, kind: ItemKind) {
        match kind {
            ItemKind::Pod => {
                if let Some(pod) = self.typed::<Pod>(value, source) {
                    self.set.pods.push(pod);
                }
            }
            ItemKind::NetworkPolicy => match self.typed::<NetworkPolicy>(value, source) {
                Some(policy) => self.set.network_policies.push(policy),
                None => self.set.unreadable_policies.push(policy_namespace(value)),
            },
            ItemKind::Service | ItemKind::EndpointSlice => {}
        }
    }

    /// Deserializes into a k8s-openapi type, re-reading the document text
    /// when there is one so that type errors carry their line.
    fn typed<T: DeserializeOwned>(&mut self, value: &Value, source: &Source<'_>) -> Option<T> {
        let result = match source {
            Source::Yaml(doc) => {
                serde_yaml::from_str::<T>(doc.text).map_err(|err| yaml_error(&err, doc.first_line))
            }
            Source::Json { text, first_line } => serde_json::from_str::<T>(text).map_err(|err| {
                let line = (err.line() > 0).then(|| first_line + err.line() - 1);
                (line, strip_json_location(&err))
            }),
            Source::ListItem { .. } => {
                serde_yaml::from_value::<T>(value.clone()).map_err(|err| (None, err.to_string()))
            }
        };
        match result {
            Ok(object) => Some(object),
            Err((line, message)) => {
                let message = format!("{}{}{message}", source.prefix(), describe(value));
                self.problem(line.or(Some(source.line())), message);
                None
            }
        }
    }
}

/// The namespace a NetworkPolicy document applies to, as `kubectl apply`
/// reads it (`default` when unset), or `None` if its metadata is unreadable.
fn policy_namespace(value: &Value) -> Option<String> {
    match value.get("metadata") {
        None | Some(Value::Null) => Some("default".into()),
        Some(Value::Mapping(meta)) => match meta.get("namespace") {
            None | Some(Value::Null) => Some("default".into()),
            Some(ns) => ns.as_str().map(str::to_owned),
        },
        Some(_) => None,
    }
}

/// `Service istio-system/istio-ingressgateway: ` for messages, when known.
fn describe(value: &Value) -> String {
    let kind = value.get("kind").and_then(Value::as_str);
    let meta = value.get("metadata");
    let name = meta.and_then(|m| m.get("name")).and_then(Value::as_str);
    let namespace = meta
        .and_then(|m| m.get("namespace"))
        .and_then(Value::as_str);
    match (kind, namespace, name) {
        (Some(kind), Some(ns), Some(name)) => format!("{kind} {ns}/{name}: "),
        (Some(kind), None, Some(name)) => format!("{kind} {name}: "),
        (None, Some(ns), Some(name)) => format!("{ns}/{name}: "),
        (None, None, Some(name)) => format!("{name}: "),
        _ => String::new(),
    }
}

/// A serde_yaml error of a document starting at `first_line`, as a
/// file-absolute line and a message whose line numbers are file-absolute.
fn yaml_error(err: &serde_yaml::Error, first_line: usize) -> (Option<usize>, String) {
    let message = err.to_string();
    let Some(location) = err.location() else {
        return (None, message);
    };
    let line = first_line + location.line() - 1;
    let suffix = format!(" at line {} column {}", location.line(), location.column());
    let message = match message.strip_suffix(&suffix) {
        // Deserialization errors: the line is reported separately.
        Some(stripped) => stripped.to_owned(),
        // libyaml syntax errors mention up to two positions ("..., while
        // parsing a block mapping at line 3 column 1"): make them absolute.
        None => shift_line_numbers(&message, first_line - 1),
    };
    (Some(line), message)
}

/// Adds `by` to every "line N" in a libyaml message.
fn shift_line_numbers(message: &str, by: usize) -> String {
    if by == 0 {
        return message.to_owned();
    }
    let mut out = String::with_capacity(message.len() + 8);
    let mut rest = message;
    while let Some(pos) = rest.find("line ") {
        let (before, after) = rest.split_at(pos + "line ".len());
        out.push_str(before);
        let digits = after.len() - after.trim_start_matches(|c: char| c.is_ascii_digit()).len();
        match after[..digits].parse::<usize>() {
            Ok(n) => out.push_str(&(n.saturating_add(by)).to_string()),
            Err(_) => out.push_str(&after[..digits]),
        }
        rest = &after[digits..];
    }
    out.push_str(rest);
    out
}

fn strip_json_location(err: &serde_json::Error) -> String {
    let message = err.to_string();
    let suffix = format!(" at line {} column {}", err.line(), err.column());
    match message.strip_suffix(&suffix) {
        Some(stripped) => stripped.to_owned(),
        None => message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SERVICE_A: &str = "\
apiVersion: v1
kind: Service
metadata:
  name: a
  namespace: default
spec:
  type: NodePort
  ports:
  - port: 80
    nodePort: 30080
";

    fn names(set: &ManifestSet) -> Vec<String> {
        set.services
            .iter()
            .map(|s| s.metadata.name.clone().unwrap_or_default())
            .chain(
                set.endpoint_slices
                    .iter()
                    .map(|s| s.metadata.name.clone().unwrap_or_default()),
            )
            .collect()
    }

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(name)
    }

    /// A scratch directory under the system temp dir, removed on drop.
    struct ScratchDir(PathBuf);

    impl ScratchDir {
        fn new(tag: &str) -> Self {
            let dir = std::env::temp_dir()
                .join(format!("forwarder-manifest-{tag}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir).expect("create scratch dir");
            ScratchDir(dir)
        }
    }

    impl Drop for ScratchDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn multi_document_yaml() {
        let text = format!(
            "{SERVICE_A}---\n{}---\n\
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: a-xyz
  namespace: default
  labels:
    kubernetes.io/service-name: a
addressType: IPv4
endpoints:
- addresses: [10.0.0.1]
ports:
- port: 8080
",
            SERVICE_A.replace("name: a\n", "name: b\n")
        );
        let set = parse_str(Path::new("m.yaml"), &text);
        assert!(set.problems.is_empty(), "{:?}", set.problems);
        assert_eq!(names(&set), ["a", "b", "a-xyz"]);
        let slice = &set.endpoint_slices[0];
        assert_eq!(slice.address_type, "IPv4");
        assert_eq!(slice.endpoints[0].addresses, ["10.0.0.1"]);
        assert_eq!(
            set.services[0]
                .spec
                .as_ref()
                .unwrap()
                .ports
                .as_ref()
                .unwrap()[0]
                .node_port,
            Some(30080)
        );
    }

    #[test]
    fn leading_marker_comments_and_empty_documents_are_fine() {
        let text = format!("# header\n---\n---\n# only a comment\n---\n{SERVICE_A}...\n---\n");
        let set = parse_str(Path::new("m.yaml"), &text);
        assert!(set.problems.is_empty(), "{:?}", set.problems);
        assert_eq!(names(&set), ["a"]);
    }

    #[test]
    fn json_object_and_list() {
        let text = r#"{
  "apiVersion": "v1",
  "kind": "List",
  "items": [
    {"apiVersion": "v1", "kind": "Service",
     "metadata": {"name": "a", "namespace": "default"},
     "spec": {"type": "NodePort", "ports": [{"port": 80, "nodePort": 30080}]}},
    {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d"}},
    {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
     "metadata": {"name": "a-1", "namespace": "default"},
     "addressType": "IPv4", "endpoints": []}
  ]
}
{"apiVersion": "v1", "kind": "Service", "metadata": {"name": "b"}}
"#;
        let set = parse_str(Path::new("m.json"), text);
        assert!(set.problems.is_empty(), "{:?}", set.problems);
        assert_eq!(names(&set), ["a", "b", "a-1"]);
        assert_eq!(set.ignored_documents, 1);
    }

    #[test]
    fn yaml_list_as_kubectl_prints_it() {
        let text = "\
apiVersion: v1
items:
- apiVersion: v1
  kind: Service
  metadata:
    name: a
    namespace: default
  spec:
    ports:
    - port: 80
- apiVersion: v1
  kind: ConfigMap
  metadata:
    name: c
kind: List
metadata:
  resourceVersion: \"\"
";
        let set = parse_str(Path::new("list.yaml"), text);
        assert!(set.problems.is_empty(), "{:?}", set.problems);
        assert_eq!(names(&set), ["a"]);
        assert_eq!(set.ignored_documents, 1);
    }

    #[test]
    fn typed_list_items_have_no_kind() {
        let text = "\
apiVersion: v1
kind: ServiceList
items:
- metadata: {name: a}
  spec: {ports: [{port: 80}]}
- metadata: {name: b}
  spec: {ports: oops}
";
        let set = parse_str(Path::new("raw.yaml"), text);
        assert_eq!(names(&set), ["a"]);
        assert_eq!(set.problems.len(), 1, "{:?}", set.problems);
        let problem = &set.problems[0];
        assert_eq!(problem.line, Some(1));
        assert!(
            problem.message.starts_with("items[1]: b: "),
            "{}",
            problem.message
        );
        assert!(
            problem.message.contains("invalid type"),
            "{}",
            problem.message
        );
    }

    #[test]
    fn pods_and_network_policies_are_read_and_unreadable_policies_keep_their_namespace() {
        let text = "\
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: shop, labels: {app: web}}
spec: {nodeName: node1, containers: []}
status: {podIP: 10.244.1.5}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny-one, namespace: shop}
spec: {podSelector: {matchLabels: {app: web}}}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: broken, namespace: shop}
spec: {podSelector: app=web}
---
apiVersion: networking.k8s.io/v1beta1
kind: NetworkPolicy
metadata: {name: old}
---
kind: List
apiVersion: v1
items:
- apiVersion: networking.k8s.io/v1
  kind: NetworkPolicy
  metadata: {name: listed, namespace: db}
  spec: {}
- apiVersion: networking.k8s.io/v1
  kind: NetworkPolicy
  metadata: 7
";
        let set = parse_str(Path::new("p.yaml"), text);
        assert_eq!(set.pods.len(), 1);
        assert_eq!(set.pods[0].metadata.name.as_deref(), Some("web-1"));
        let policies: Vec<&str> = set
            .network_policies
            .iter()
            .filter_map(|p| p.metadata.name.as_deref())
            .collect();
        assert_eq!(policies, ["deny-one", "listed"]);
        assert_eq!(
            set.unreadable_policies,
            [Some("shop".to_string()), Some("default".to_string()), None]
        );
        assert_eq!(set.problems.len(), 3, "{:?}", set.problems);
        assert_eq!(set.ignored_documents, 0);
    }

    #[test]
    fn bad_list_item_keeps_the_others() {
        let text = "\
kind: List
apiVersion: v1
items:
- apiVersion: v1
  kind: Service
  metadata: {name: bad, namespace: ns}
  spec: {ports: 7}
- apiVersion: v1
  kind: Service
  metadata: {name: good}
- 42
";
        let set = parse_str(Path::new("l.yaml"), text);
        assert_eq!(names(&set), ["good"]);
        let messages: Vec<String> = set.problems.iter().map(|p| p.to_string()).collect();
        assert_eq!(messages.len(), 2, "{messages:?}");
        assert!(
            messages[0].starts_with("l.yaml:1: items[0]: Service ns/bad: "),
            "{}",
            messages[0]
        );
        assert!(
            messages[1].starts_with("l.yaml:1: items[2]: not a Kubernetes object"),
            "{}",
            messages[1]
        );
    }

    #[test]
    fn directory_takes_manifest_files_sorted_and_skips_others() {
        let set = load_path(&fixture("dir")).expect("load fixture dir");
        assert!(set.problems.is_empty(), "{:?}", set.problems);
        // 10-services.yaml (two Services), 20-slices.json, 30-more.yml;
        // .hidden.yaml, notes.txt and the subdirectory are not read.
        assert_eq!(names(&set), ["web", "dns", "late", "web-abc12"]);
        assert_eq!(set.ignored_documents, 1);
    }

    #[test]
    fn single_file_path() {
        let set = load_path(&fixture("dir/30-more.yml")).expect("load fixture file");
        assert_eq!(names(&set), ["late"]);
    }

    #[test]
    fn missing_path_is_an_error() {
        let err = load_path(Path::new("/nonexistent/forwarder/manifests")).unwrap_err();
        assert!(matches!(err, ManifestError::Access { .. }), "{err}");
        assert!(
            err.to_string().contains("/nonexistent/forwarder/manifests"),
            "{err}"
        );
    }

    #[test]
    fn unknown_kind_is_counted_not_reported() {
        let text = "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\n---\napiVersion: v1\nkind: Endpoints\nmetadata: {name: e}\n";
        let set = parse_str(Path::new("k.yaml"), text);
        assert!(set.problems.is_empty());
        assert!(names(&set).is_empty());
        assert_eq!(set.ignored_documents, 2);
    }

    #[test]
    fn unsupported_api_version_is_reported() {
        let text = "apiVersion: discovery.k8s.io/v1beta1\nkind: EndpointSlice\nmetadata: {name: s}\naddressType: IPv4\n";
        let set = parse_str(Path::new("v.yaml"), text);
        assert!(set.endpoint_slices.is_empty());
        assert_eq!(set.problems.len(), 1);
        assert!(set.problems[0].message.contains("discovery.k8s.io/v1beta1"));
    }

    #[test]
    fn unknown_fields_are_ignored() {
        let text = "\
apiVersion: v1
kind: Service
metadata:
  name: a
  futureField: {x: 1}
spec:
  type: NodePort
  someNewSpecField: [1, 2]
  ports:
  - port: 80
    nodePort: 30080
    shinyNewPortOption: true
status:
  whatever: 3
";
        let set = parse_str(Path::new("u.yaml"), text);
        assert!(set.problems.is_empty(), "{:?}", set.problems);
        let spec = set.services[0].spec.as_ref().unwrap();
        assert_eq!(spec.ports.as_ref().unwrap()[0].node_port, Some(30080));
    }

    #[test]
    fn syntax_error_in_second_document_keeps_first_and_third() {
        let text = format!(
            "{SERVICE_A}---\napiVersion: v1\nkind: Service\nmetadata:\n  name: broken\n   namespace: x\n---\n{}",
            SERVICE_A.replace("name: a\n", "name: c\n")
        );
        // SERVICE_A has 10 lines: `---` is line 11, the bad indentation is on line 16.
        let set = parse_str(Path::new("dir/multi.yaml"), &text);
        assert_eq!(names(&set), ["a", "c"]);
        assert_eq!(set.problems.len(), 1, "{:?}", set.problems);
        let problem = &set.problems[0];
        assert_eq!(problem.file, Path::new("dir/multi.yaml"));
        assert_eq!(problem.line, Some(16), "{problem}");
        assert!(
            problem.to_string().starts_with("dir/multi.yaml:16: "),
            "{problem}"
        );
    }

    #[test]
    fn positions_inside_syntax_messages_are_file_absolute() {
        // libyaml names two positions here: where it gave up and where the
        // flow sequence began.
        let text = format!("{SERVICE_A}---\nkind: Service\nports: [1, 2\nname: x\n");
        let set = parse_str(Path::new("p.yaml"), &text);
        assert_eq!(names(&set), ["a"]);
        assert_eq!(set.problems.len(), 1, "{:?}", set.problems);
        let problem = &set.problems[0];
        assert_eq!(problem.line, Some(14), "{problem}");
        assert!(problem.message.contains("line 14"), "{problem}");
        assert!(problem.message.contains("line 13"), "{problem}");
    }

    #[test]
    fn shift_line_numbers_only_touches_line_numbers() {
        assert_eq!(
            shift_line_numbers("x at line 3 column 1, y at line 1 column 4", 10),
            "x at line 13 column 1, y at line 11 column 4"
        );
        assert_eq!(shift_line_numbers("line x, line ", 5), "line x, line ");
    }

    #[test]
    fn wrong_field_type_is_reported_with_line() {
        let text = format!(
            "{SERVICE_A}---\napiVersion: v1\nkind: Service\nmetadata:\n  name: bad\nspec:\n  ports: \"oops\"\n"
        );
        let set = parse_str(Path::new("t.yaml"), &text);
        assert_eq!(names(&set), ["a"]);
        assert_eq!(set.problems.len(), 1);
        let problem = &set.problems[0];
        assert_eq!(problem.line, Some(17), "{problem}");
        assert!(problem.message.contains("Service bad"), "{problem}");
        assert!(problem.message.contains("spec.ports"), "{problem}");
        assert!(problem.message.contains("invalid type"), "{problem}");
    }

    #[test]
    fn json_errors_have_lines() {
        let bad_type = "{\"apiVersion\": \"v1\", \"kind\": \"Service\",\n \"metadata\": {\"name\": \"x\"},\n \"spec\": {\"ports\": \"oops\"}}\n";
        let set = parse_str(Path::new("x.json"), bad_type);
        assert!(set.services.is_empty());
        assert_eq!(set.problems.len(), 1);
        assert_eq!(set.problems[0].line, Some(3), "{}", set.problems[0]);

        let second_doc_broken = "{\"apiVersion\": \"v1\", \"kind\": \"Service\", \"metadata\": {\"name\": \"ok\"}}\n\n{\"apiVersion\": \"v1\",\n \"kind\" \"Service\"}\n";
        let set = parse_str(Path::new("y.json"), second_doc_broken);
        assert_eq!(names(&set), ["ok"]);
        assert_eq!(set.problems.len(), 1);
        assert_eq!(set.problems[0].line, Some(4), "{}", set.problems[0]);
    }

    #[test]
    fn empty_and_comment_only_files() {
        for text in ["", "\n\n", "# nothing\n", "---\n", "\u{feff}"] {
            let set = parse_str(Path::new("e.yaml"), text);
            assert!(
                set.problems.is_empty() && names(&set).is_empty(),
                "{text:?}: {set:?}"
            );
            assert_eq!(set.ignored_documents, 0);
        }
        let set = parse_str(Path::new("e.json"), " \n");
        assert!(set.problems.is_empty() && names(&set).is_empty());
    }

    #[test]
    fn non_objects_are_reported() {
        let set = parse_str(
            Path::new("s.yaml"),
            "just a string\n---\n- 1\n---\nmetadata: {name: x}\n",
        );
        let lines: Vec<Option<usize>> = set.problems.iter().map(|p| p.line).collect();
        assert_eq!(lines, [Some(1), Some(3), Some(5)]);
    }

    #[test]
    fn garbage_never_panics() {
        let inputs = [
            "\t\tkind: [",
            "{{{{",
            "kind: List\napiVersion: v1\nitems: 5\n",
            "kind: List\nitems: [null, {kind: List, items: [{kind: Service, apiVersion: v1, spec: 3}]}]\n",
            "a: &x [*x]\n",
            "--- !tag\n--- |\n  text\n...\n%YAML 1.2\n---\nkind: Service\napiVersion: v1\n",
            "kind: Service\napiVersion: v1\nspec:\n  ports:\n  - port: 99999999999999999999\n",
        ];
        for input in inputs {
            let _ = parse_str(Path::new("g.yaml"), input);
            let _ = parse_str(Path::new("g.json"), input);
        }
        let set = parse_bytes(Path::new("b.yaml"), b"kind: Service\n\xff\xfe\n");
        assert_eq!(set.problems.len(), 1);
        assert_eq!(set.problems[0].line, Some(2));
    }

    #[test]
    fn deeply_nested_lists_are_bounded() {
        let mut text = String::from("{kind: Service, apiVersion: v1, metadata: {name: deep}}");
        for _ in 0..(MAX_LIST_DEPTH + 2) {
            text = format!("{{kind: List, apiVersion: v1, items: [{text}]}}");
        }
        let set = parse_str(Path::new("d.yaml"), &text);
        assert!(set.services.is_empty());
        assert_eq!(set.problems.len(), 1);
        assert!(set.problems[0].message.contains("nested too deeply"));
    }

    #[test]
    fn splitter_positions() {
        let docs =
            split_yaml_documents("a: 1\n---\nb: 2\n--- # c\n\nc: 3\n...\n%YAML 1.2\n---\nd: 4");
        let got: Vec<(usize, usize)> = docs
            .iter()
            .map(|d| (d.first_line, d.content_line))
            .collect();
        assert_eq!(got, [(1, 1), (2, 3), (4, 6), (8, 10)]);
        assert_eq!(docs[3].text, "%YAML 1.2\n---\nd: 4");
        // `----` or `---x` is content, not a marker.
        assert_eq!(split_yaml_documents("a: |\n  x\nb: ---x\n").len(), 1);
    }

    #[test]
    fn fingerprint_changes_with_content_and_file_set() {
        let dir = ScratchDir::new("fp");
        let file = dir.0.join("a.yaml");
        fs::write(&file, SERVICE_A).unwrap();
        let first = fingerprint(&dir.0).unwrap();
        assert_eq!(first, fingerprint(&dir.0).unwrap());

        fs::write(&file, format!("{SERVICE_A}# more\n")).unwrap();
        let second = fingerprint(&dir.0).unwrap();
        assert_ne!(first, second);

        fs::write(dir.0.join("notes.txt"), "ignored").unwrap();
        assert_eq!(second, fingerprint(&dir.0).unwrap());

        fs::write(dir.0.join("b.yml"), "").unwrap();
        assert_ne!(second, fingerprint(&dir.0).unwrap());

        assert_ne!(
            fingerprint(&file).unwrap(),
            fingerprint(&dir.0.join("b.yml")).unwrap()
        );
        assert!(fingerprint(&dir.0.join("missing")).is_err());
    }

    #[test]
    fn bad_files_in_a_directory_do_not_stop_the_others() {
        let dir = ScratchDir::new("badfiles");
        fs::write(dir.0.join("a.yaml"), SERVICE_A).unwrap();
        // Not text: reported against its file.
        fs::write(dir.0.join("b.yaml"), b"\xff").unwrap();
        // A dangling symlink (a ConfigMap volume mid-update): not listed.
        std::os::unix::fs::symlink(dir.0.join("gone.yaml"), dir.0.join("c.yaml")).unwrap();
        let set = load_path(&dir.0).unwrap();
        assert_eq!(names(&set), ["a"]);
        assert_eq!(set.problems.len(), 1, "{:?}", set.problems);
        assert_eq!(set.problems[0].file, dir.0.join("b.yaml"));
    }
}
