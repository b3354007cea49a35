//! A small, real server run inside a pod's network namespace, and the client
//! the tests run inside the client's namespace.
//!
//! ```text
//! podserver serve --name <pod-name> [--http-port 80] [--udp-port 5353]
//! podserver udp-request <addr:port> [--count N] [--timeout-ms 1000] [--interval-ms 0]
//! podserver http-get <url> [--count N] [--parallel P] [--keep-alive] [--timeout-ms 3000] [--interval-ms 0]
//! podserver bulk <url> [--connections N] [--bytes B] [--seed S] [--mode updown|echo|up|down|mixed] [--timeout-ms 10000] [--deadline-ms 120000]
//! ```
//!
//! `serve` answers HTTP/1.1 `GET /productpage` with 200, a small HTML page
//! titled "Simple Bookstore App" and the headers `X-Pod: <pod-name>` and
//! `X-Client: <peer ip:port as seen by the pod>` (any other path: 404), with
//! keep-alive, one thread per connection. For bulk transfers it also serves
//! `GET /bytes?size=N&seed=S` (N bytes of the seeded stream of
//! [`integration_tests::pattern`]), `PUT /bytes?seed=S` (reads the body and
//! checks it byte for byte against that stream: 200 `ok <N>`, or 422 with the
//! first differing byte) and `POST /echo?seed=S` (streams the body back while
//! it arrives, checking it on the way; a mismatch closes the connection
//! mid-body). `GET /zeros?size=N` and `PUT /zeros` do the same without
//! content (zero bytes, unchecked) for throughput measurements; a client
//! that stops early just closes the connection. Every UDP datagram is
//! answered with
//! `<pod-name> <peer ip:port>`. Once both sockets are bound it prints one line
//! `podserver <name> listening ...` on stdout.
//!
//! `udp-request` sends N datagrams on one *connected* UDP socket (so only a
//! reply from the address it sent to is received) and prints each reply on a
//! line; it exits 1 on a timeout.
//!
//! `http-get` prints one tab-separated line per request:
//! `<status>\t<X-Pod>\t<X-Client>\t<local addr>\t<title>`, or
//! `ERR\t<error>` when the request failed (exit status 1 then). With
//! `--keep-alive` all N requests share one connection (sequentially);
//! otherwise each request opens its own connection (distinct source ports),
//! `--parallel P` at a time.
//!
//! `bulk` opens N connections at once, each moving B bytes of the stream of
//! seed S+i: `updown` uploads them with `PUT /bytes` and then downloads B
//! other bytes with `GET /bytes` on the same connection, `echo` sends them to
//! `POST /echo` while reading the echo, `up`/`down` one direction only,
//! `mixed` alternates `updown` and `echo`. Every received byte is checked.
//! One line per connection: `OK\t<mode>\t<X-Pod>\t<X-Client>\t<local
//! addr>\t<bytes sent>\t<bytes received>\t<ms>`, or `ERR\t<mode>\t<error>`
//! (exit status 1 then). `--timeout-ms` bounds every connect, read and write;
//! `--deadline-ms` each connection as a whole (a crawling transfer fails).

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs, UdpSocket},
    process::ExitCode,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use integration_tests::pattern::Pattern;

const PAGE_TITLE: &str = "Simple Bookstore App";
const MAX_HEAD: usize = 16 * 1024;

type Result<T> = std::result::Result<T, String>;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("serve") => serve(&args[1..]),
        Some("udp-request") => udp_request(&args[1..]),
        Some("http-get") => http_get(&args[1..]),
        Some("bulk") => bulk(&args[1..]),
        _ => Err(usage()),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("podserver: {e}");
            ExitCode::from(2)
        }
    }
}

fn usage() -> String {
    "usage:\n  podserver serve --name <pod-name> [--http-port 80] [--udp-port 5353]\n  \
     podserver udp-request <addr:port> [--count N] [--timeout-ms 1000] [--interval-ms 0]\n  \
     podserver http-get <url> [--count N] [--parallel P] [--keep-alive] [--timeout-ms 3000] [--interval-ms 0]\n  \
     podserver bulk <url> [--connections N] [--bytes B] [--seed S] [--mode updown|echo|up|down|mixed] [--timeout-ms 10000] [--deadline-ms 120000]"
        .to_string()
}

/// Minimal flag parsing: positional arguments, `--flag value` and boolean flags.
struct Args {
    positional: Vec<String>,
    options: Vec<(String, Option<String>)>,
}

impl Args {
    fn parse(args: &[String], boolean: &[&str]) -> Result<Args> {
        let mut positional = Vec::new();
        let mut options = Vec::new();
        let mut it = args.iter();
        while let Some(a) = it.next() {
            if let Some(flag) = a.strip_prefix("--") {
                if boolean.contains(&flag) {
                    options.push((flag.to_string(), None));
                } else {
                    let v = it
                        .next()
                        .ok_or_else(|| format!("--{flag} needs a value\n{}", usage()))?;
                    options.push((flag.to_string(), Some(v.clone())));
                }
            } else {
                positional.push(a.clone());
            }
        }
        Ok(Args {
            positional,
            options,
        })
    }

    fn flag(&self, name: &str) -> bool {
        self.options.iter().any(|(k, _)| k == name)
    }

    fn value(&self, name: &str) -> Option<&str> {
        self.options
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .and_then(|(_, v)| v.as_deref())
    }

    fn number<T: std::str::FromStr>(&self, name: &str, default: T) -> Result<T> {
        match self.value(name) {
            None => Ok(default),
            Some(v) => v
                .parse()
                .map_err(|_| format!("--{name}: not a valid number: {v:?}")),
        }
    }

    fn check_known(&self, known: &[&str]) -> Result<()> {
        for (k, _) in &self.options {
            if !known.contains(&k.as_str()) {
                return Err(format!("unknown option --{k}\n{}", usage()));
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------- serve ----

fn serve(args: &[String]) -> Result<ExitCode> {
    let args = Args::parse(args, &[])?;
    args.check_known(&["name", "http-port", "udp-port"])?;
    let name = args
        .value("name")
        .ok_or_else(|| format!("serve needs --name\n{}", usage()))?
        .to_string();
    let http_port: u16 = args.number("http-port", 80)?;
    let udp_port: u16 = args.number("udp-port", 5353)?;

    let tcp = TcpListener::bind(("0.0.0.0", http_port))
        .map_err(|e| format!("binding TCP port {http_port}: {e}"))?;
    let udp = UdpSocket::bind(("0.0.0.0", udp_port))
        .map_err(|e| format!("binding UDP port {udp_port}: {e}"))?;

    let udp_name = name.clone();
    std::thread::spawn(move || serve_udp(&udp_name, &udp));

    println!("podserver {name} listening on TCP {http_port} and UDP {udp_port}");
    std::io::stdout()
        .flush()
        .map_err(|e| format!("writing stdout: {e}"))?;

    let name = Arc::new(name);
    for conn in tcp.incoming() {
        match conn {
            Ok(stream) => {
                let name = Arc::clone(&name);
                std::thread::spawn(move || {
                    if let Err(e) = serve_http_connection(&name, stream) {
                        eprintln!("podserver {name}: connection: {e}");
                    }
                });
            }
            Err(e) => eprintln!("podserver {name}: accept: {e}"),
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn serve_udp(name: &str, sock: &UdpSocket) {
    let mut buf = [0u8; 2048];
    loop {
        match sock.recv_from(&mut buf) {
            Ok((_, peer)) => {
                let reply = format!("{name} {peer}");
                if let Err(e) = sock.send_to(reply.as_bytes(), peer) {
                    eprintln!("podserver {name}: udp reply to {peer}: {e}");
                }
            }
            Err(e) => {
                eprintln!("podserver {name}: udp recv: {e}");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

/// Reads one message head (up to and including the blank line). `Ok(None)`
/// on a clean end of stream before any byte.
fn read_head(reader: &mut impl BufRead) -> Result<Option<Vec<String>>> {
    let mut lines = Vec::new();
    let mut total = 0;
    loop {
        let mut line = String::new();
        let n = reader
            .read_line(&mut line)
            .map_err(|e| format!("reading: {e}"))?;
        if n == 0 {
            if lines.is_empty() {
                return Ok(None);
            }
            return Err("connection closed in the middle of a message head".into());
        }
        total += n;
        if total > MAX_HEAD {
            return Err("message head too large".into());
        }
        let line = line.trim_end_matches(['\r', '\n']).to_string();
        if line.is_empty() {
            if lines.is_empty() {
                continue; // tolerate stray CRLF between messages
            }
            return Ok(Some(lines));
        }
        lines.push(line);
    }
}

fn header<'a>(head: &'a [String], name: &str) -> Option<&'a str> {
    head.iter().skip(1).find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// Splits `/path?a=1&b=2` into the path and its query parameters.
fn split_target(target: &str) -> (&str, Vec<(&str, &str)>) {
    match target.split_once('?') {
        None => (target, Vec::new()),
        Some((path, query)) => (
            path,
            query
                .split('&')
                .filter(|kv| !kv.is_empty())
                .map(|kv| kv.split_once('=').unwrap_or((kv, "")))
                .collect(),
        ),
    }
}

fn query_number(query: &[(&str, &str)], name: &str) -> Result<u64> {
    let v = query
        .iter()
        .find(|(k, _)| *k == name)
        .map(|(_, v)| *v)
        .ok_or_else(|| format!("missing query parameter {name}"))?;
    v.parse()
        .map_err(|_| format!("query parameter {name}: not a number: {v:?}"))
}

/// Bytes moved per read or write in the bulk modes.
const CHUNK: usize = 128 * 1024;

/// Writes the next `len` bytes of `pattern` to `out`.
fn send_pattern(out: &mut impl Write, pattern: &mut Pattern, len: u64) -> std::io::Result<()> {
    let mut buf = vec![0u8; CHUNK];
    let mut left = len;
    while left > 0 {
        let n = left.min(CHUNK as u64) as usize;
        pattern.fill(&mut buf[..n]);
        out.write_all(&buf[..n])?;
        left -= n as u64;
    }
    out.flush()
}

/// What the server sends for one request: status, body, and whether the
/// connection must close after it.
struct Reply {
    status: &'static str,
    content_type: &'static str,
    body: Body,
}

enum Body {
    Text(String),
    /// `len` bytes of the stream of `seed`.
    Pattern {
        seed: u64,
        len: u64,
    },
    /// `len` zero bytes, for throughput measurements (nothing to generate).
    Zeros {
        len: u64,
    },
}

fn serve_http_connection(name: &str, stream: TcpStream) -> Result<()> {
    let peer = stream.peer_addr().map_err(|e| format!("peer_addr: {e}"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .map_err(|e| format!("set_read_timeout: {e}"))?;
    let mut writer = stream
        .try_clone()
        .map_err(|e| format!("cloning stream: {e}"))?;
    let mut reader = BufReader::new(stream);
    while let Some(head) = read_head(&mut reader)? {
        let mut parts = head[0].split_whitespace();
        let (method, target, version) = (
            parts.next().unwrap_or(""),
            parts.next().unwrap_or(""),
            parts.next().unwrap_or(""),
        );
        let (path, query) = split_target(target);
        let body_len: u64 = match header(&head, "content-length") {
            Some(len) => len.parse().map_err(|_| "bad Content-Length".to_string())?,
            None => 0,
        };
        let close = version != "HTTP/1.1"
            || header(&head, "connection").is_some_and(|v| v.eq_ignore_ascii_case("close"));
        let head_of = |status: &str, content_type: &str, len: u64| {
            format!(
                "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n\
                 Content-Length: {len}\r\nX-Pod: {name}\r\nX-Client: {peer}\r\nConnection: {}\r\n\r\n",
                if close { "close" } else { "keep-alive" },
            )
        };
        if method == "POST" && path == "/echo" {
            // Streams the body back as it arrives (the client reads while it
            // sends), checking it against the stream of `seed` on the way.
            let seed = query_number(&query, "seed")?;
            writer
                .write_all(head_of("200 OK", "application/octet-stream", body_len).as_bytes())
                .map_err(|e| format!("writing echo head: {e}"))?;
            let mut pattern = Pattern::new(seed);
            let mut buf = vec![0u8; CHUNK];
            let mut left = body_len;
            while left > 0 {
                let want = left.min(CHUNK as u64) as usize;
                let n = reader
                    .read(&mut buf[..want])
                    .map_err(|e| format!("echo: reading at byte {}: {e}", pattern.position()))?;
                if n == 0 {
                    return Err(format!(
                        "echo: connection closed after {} of {body_len} bytes",
                        pattern.position()
                    ));
                }
                if let Err(m) = pattern.check(&buf[..n]) {
                    // Closing mid-body tells the client the echo is short.
                    return Err(format!("echo from {peer}: received {m}"));
                }
                writer
                    .write_all(&buf[..n])
                    .map_err(|e| format!("echo: writing: {e}"))?;
                left -= n as u64;
            }
            if close {
                break;
            }
            continue;
        }
        if method == "PUT" && path == "/zeros" {
            // A throughput sink: the body is read and dropped unchecked; a
            // client that stops early (a timed measurement) just closes.
            let mut buf = vec![0u8; CHUNK];
            let mut left = body_len;
            while left > 0 {
                let want = left.min(CHUNK as u64) as usize;
                match reader.read(&mut buf[..want]) {
                    Ok(0) | Err(_) => return Ok(()),
                    Ok(n) => left -= n as u64,
                }
            }
            let text = format!("ok {body_len}\n");
            let response = head_of("200 OK", "text/plain", text.len() as u64) + &text;
            writer
                .write_all(response.as_bytes())
                .map_err(|e| format!("writing response: {e}"))?;
            if close {
                break;
            }
            continue;
        }
        let reply = if method == "PUT" && path == "/bytes" {
            // An upload, checked byte for byte against the stream of `seed`.
            let seed = query_number(&query, "seed")?;
            let mut pattern = Pattern::new(seed);
            let mut first_mismatch = None;
            let mut buf = vec![0u8; CHUNK];
            let mut left = body_len;
            while left > 0 {
                let want = left.min(CHUNK as u64) as usize;
                let n = reader
                    .read(&mut buf[..want])
                    .map_err(|e| format!("upload: reading at byte {}: {e}", pattern.position()))?;
                if n == 0 {
                    return Err(format!(
                        "upload: connection closed after {} of {body_len} bytes",
                        body_len - left
                    ));
                }
                if first_mismatch.is_none() {
                    if let Err(m) = pattern.check(&buf[..n]) {
                        first_mismatch = Some(m);
                    }
                }
                left -= n as u64;
            }
            match first_mismatch {
                None => Reply {
                    status: "200 OK",
                    content_type: "text/plain",
                    body: Body::Text(format!("ok {body_len}\n")),
                },
                Some(m) => {
                    eprintln!("podserver {name}: upload from {peer}: {m}");
                    Reply {
                        status: "422 Unprocessable Entity",
                        content_type: "text/plain",
                        body: Body::Text(format!("mismatch: {m}\n")),
                    }
                }
            }
        } else {
            // Discard a request body, if any.
            std::io::copy(&mut (&mut reader).take(body_len), &mut std::io::sink())
                .map_err(|e| format!("reading body: {e}"))?;
            if method == "GET" && path == "/productpage" {
                Reply {
                    status: "200 OK",
                    content_type: "text/html; charset=utf-8",
                    body: Body::Text(format!(
                        "<html>\n<head><title>{PAGE_TITLE}</title></head>\n<body>\n\
                         <h1>{PAGE_TITLE}</h1>\n<p>Served by {name} to {peer}</p>\n</body>\n</html>\n"
                    )),
                }
            } else if method == "GET" && path == "/zeros" {
                Reply {
                    status: "200 OK",
                    content_type: "application/octet-stream",
                    body: Body::Zeros {
                        len: query_number(&query, "size")?,
                    },
                }
            } else if method == "GET" && path == "/bytes" {
                Reply {
                    status: "200 OK",
                    content_type: "application/octet-stream",
                    body: Body::Pattern {
                        seed: query_number(&query, "seed")?,
                        len: query_number(&query, "size")?,
                    },
                }
            } else {
                Reply {
                    status: "404 Not Found",
                    content_type: "text/plain",
                    body: Body::Text("not found\n".to_string()),
                }
            }
        };
        match reply.body {
            Body::Text(text) => {
                let response = head_of(reply.status, reply.content_type, text.len() as u64) + &text;
                writer
                    .write_all(response.as_bytes())
                    .map_err(|e| format!("writing response: {e}"))?;
            }
            Body::Pattern { seed, len } => {
                writer
                    .write_all(head_of(reply.status, reply.content_type, len).as_bytes())
                    .and_then(|()| send_pattern(&mut writer, &mut Pattern::new(seed), len))
                    .map_err(|e| format!("writing {len} bytes: {e}"))?;
            }
            Body::Zeros { len } => {
                writer
                    .write_all(head_of(reply.status, reply.content_type, len).as_bytes())
                    .map_err(|e| format!("writing the head: {e}"))?;
                let buf = vec![0u8; CHUNK];
                let mut left = len;
                while left > 0 {
                    let n = left.min(CHUNK as u64) as usize;
                    if writer.write_all(&buf[..n]).is_err() {
                        // The client stopped reading (a timed measurement).
                        return Ok(());
                    }
                    left -= n as u64;
                }
            }
        }
        if close {
            break;
        }
    }
    Ok(())
}

// ---------------------------------------------------------- udp-request ----

fn udp_request(args: &[String]) -> Result<ExitCode> {
    let args = Args::parse(args, &[])?;
    args.check_known(&["count", "timeout-ms", "interval-ms"])?;
    let [target] = args.positional.as_slice() else {
        return Err(format!("udp-request needs one <addr:port>\n{}", usage()));
    };
    let count: u32 = args.number("count", 1)?;
    let timeout = Duration::from_millis(args.number("timeout-ms", 1000)?);
    // A pause between datagrams: one flow that lasts across a change.
    let interval = Duration::from_millis(args.number("interval-ms", 0)?);
    let addr = resolve(target)?;

    let sock = UdpSocket::bind(("0.0.0.0", 0)).map_err(|e| format!("binding UDP: {e}"))?;
    // Connected: the kernel only delivers datagrams whose source is `addr`,
    // so a reply that is not translated back is never seen.
    sock.connect(addr)
        .map_err(|e| format!("connecting to {addr}: {e}"))?;
    sock.set_read_timeout(Some(timeout))
        .map_err(|e| format!("set_read_timeout: {e}"))?;
    let mut buf = [0u8; 2048];
    for i in 0..count {
        if i > 0 {
            std::thread::sleep(interval);
        }
        let msg = format!("request {i}");
        sock.send(msg.as_bytes())
            .map_err(|e| format!("sending to {addr}: {e}"))?;
        match sock.recv(&mut buf) {
            Ok(n) => println!("{}", String::from_utf8_lossy(&buf[..n])),
            Err(e) => {
                eprintln!("podserver: no reply from {addr} to request {i} within {timeout:?}: {e}");
                return Ok(ExitCode::FAILURE);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn resolve(target: &str) -> Result<SocketAddr> {
    target
        .to_socket_addrs()
        .map_err(|e| format!("bad address {target:?}: {e}"))?
        .next()
        .ok_or_else(|| format!("address {target:?} resolves to nothing"))
}

// ------------------------------------------------------------- http-get ----

struct Url {
    addr: SocketAddr,
    host: String,
    path: String,
}

fn parse_url(url: &str) -> Result<Url> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("only http:// URLs are supported: {url:?}"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let with_port = if authority.contains(':') {
        authority.to_string()
    } else {
        format!("{authority}:80")
    };
    Ok(Url {
        addr: resolve(&with_port)?,
        host: authority.to_string(),
        path: path.to_string(),
    })
}

struct Response {
    status: u16,
    pod: String,
    client: String,
    local: SocketAddr,
    title: String,
}

impl Response {
    fn line(&self) -> String {
        format!(
            "{}\t{}\t{}\t{}\t{}",
            self.status, self.pod, self.client, self.local, self.title
        )
    }
}

fn connect(url: &Url, timeout: Duration) -> Result<TcpStream> {
    let stream = TcpStream::connect_timeout(&url.addr, timeout)
        .map_err(|e| format!("connecting to {}: {e}", url.addr))?;
    stream
        .set_read_timeout(Some(timeout))
        .and_then(|()| stream.set_write_timeout(Some(timeout)))
        .map_err(|e| format!("setting timeouts: {e}"))?;
    Ok(stream)
}

/// One request on `stream`; reads the complete response.
fn request(reader: &mut BufReader<TcpStream>, url: &Url, keep_alive: bool) -> Result<Response> {
    let local = reader
        .get_ref()
        .local_addr()
        .map_err(|e| format!("local_addr: {e}"))?;
    let req = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: podserver\r\nConnection: {}\r\n\r\n",
        url.path,
        url.host,
        if keep_alive { "keep-alive" } else { "close" }
    );
    reader
        .get_mut()
        .write_all(req.as_bytes())
        .map_err(|e| format!("sending request: {e}"))?;
    let head = read_head(reader)?.ok_or("connection closed before a response")?;
    let status = head[0]
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad status line {:?}", head[0]))?;
    let len: usize = header(&head, "content-length")
        .ok_or("response without Content-Length")?
        .parse()
        .map_err(|_| "bad Content-Length in response".to_string())?;
    let mut body = vec![0u8; len];
    reader
        .read_exact(&mut body)
        .map_err(|e| format!("reading body: {e}"))?;
    let body = String::from_utf8_lossy(&body);
    let title = body
        .split_once("<title>")
        .and_then(|(_, rest)| rest.split_once("</title>"))
        .map(|(t, _)| t.to_string())
        .unwrap_or_default();
    Ok(Response {
        status,
        pod: header(&head, "x-pod").unwrap_or("-").to_string(),
        client: header(&head, "x-client").unwrap_or("-").to_string(),
        local,
        title,
    })
}

fn http_get(args: &[String]) -> Result<ExitCode> {
    let args = Args::parse(args, &["keep-alive"])?;
    args.check_known(&[
        "count",
        "parallel",
        "keep-alive",
        "timeout-ms",
        "interval-ms",
    ])?;
    let [url] = args.positional.as_slice() else {
        return Err(format!("http-get needs one <url>\n{}", usage()));
    };
    let url = parse_url(url)?;
    let count: usize = args.number("count", 1)?;
    let parallel: usize = args.number("parallel", 1)?;
    let timeout = Duration::from_millis(args.number("timeout-ms", 3000)?);
    // A pause after each request: paced traffic across a restart or a reload.
    let interval = Duration::from_millis(args.number("interval-ms", 0)?);
    let failed = AtomicUsize::new(0);
    let out = Mutex::new(std::io::stdout());
    let print = |r: Result<Response>| {
        let line = match r {
            Ok(r) => r.line(),
            Err(e) => {
                failed.fetch_add(1, Ordering::Relaxed);
                format!("ERR\t{e}")
            }
        };
        let mut out = out.lock().unwrap_or_else(|p| p.into_inner());
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    };

    if args.flag("keep-alive") {
        // One connection for all requests, sequentially.
        match connect(&url, timeout) {
            Ok(stream) => {
                let mut reader = BufReader::new(stream);
                for _ in 0..count {
                    let r = request(&mut reader, &url, true);
                    let broken = r.is_err();
                    print(r);
                    if broken {
                        break;
                    }
                    std::thread::sleep(interval);
                }
            }
            Err(e) => print(Err(e)),
        }
    } else {
        let next = AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..parallel.clamp(1, 64) {
                s.spawn(|| {
                    while next.fetch_add(1, Ordering::Relaxed) < count {
                        let r = connect(&url, timeout)
                            .and_then(|s| request(&mut BufReader::new(s), &url, false));
                        print(r);
                        std::thread::sleep(interval);
                    }
                });
            }
        });
    }
    Ok(if failed.load(Ordering::Relaxed) == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

// ----------------------------------------------------------------- bulk ----

/// What one bulk connection does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum BulkMode {
    /// `PUT /bytes` (the server checks), then `GET /bytes` (the client
    /// checks), on one kept-alive connection.
    UpDown,
    /// `POST /echo`: the client sends and reads the echo at the same time.
    Echo,
    /// `PUT /bytes` only.
    Up,
    /// `GET /bytes` only.
    Down,
}

impl BulkMode {
    fn name(self) -> &'static str {
        match self {
            BulkMode::UpDown => "updown",
            BulkMode::Echo => "echo",
            BulkMode::Up => "up",
            BulkMode::Down => "down",
        }
    }
}

/// What one bulk connection moved, as printed on its `OK` line.
struct BulkDone {
    pod: String,
    client: String,
    local: SocketAddr,
    sent: u64,
    received: u64,
}

/// The seed of the stream a connection downloads (distinct from its upload).
fn download_seed(seed: u64) -> u64 {
    seed ^ 0x5a5a_5a5a_0000_0001
}

/// Reads a response head; fails unless the status is 200. Returns the head.
fn response_head(reader: &mut BufReader<TcpStream>, what: &str) -> Result<Vec<String>> {
    let head = read_head(reader)
        .map_err(|e| format!("{what}: {e}"))?
        .ok_or_else(|| format!("{what}: connection closed before a response"))?;
    let status = head[0].split_whitespace().nth(1).unwrap_or("");
    if status != "200" {
        let len: usize = header(&head, "content-length")
            .and_then(|l| l.parse().ok())
            .unwrap_or(0)
            .min(4096);
        let mut body = vec![0u8; len];
        let _ = reader.read_exact(&mut body);
        return Err(format!(
            "{what}: {} {}",
            head[0],
            String::from_utf8_lossy(&body).trim()
        ));
    }
    Ok(head)
}

/// Reads a `len`-byte body and checks it against the stream of `seed`.
fn receive_pattern(
    reader: &mut BufReader<TcpStream>,
    seed: u64,
    len: u64,
    what: &str,
) -> Result<u64> {
    let mut pattern = Pattern::new(seed);
    let mut buf = vec![0u8; CHUNK];
    while pattern.position() < len {
        let want = (len - pattern.position()).min(CHUNK as u64) as usize;
        let n = reader.read(&mut buf[..want]).map_err(|e| {
            format!(
                "{what}: reading after {} of {len} bytes: {e}",
                pattern.position()
            )
        })?;
        if n == 0 {
            return Err(format!(
                "{what}: connection closed after {} of {len} bytes",
                pattern.position()
            ));
        }
        pattern
            .check(&buf[..n])
            .map_err(|m| format!("{what}: received {m}"))?;
    }
    Ok(len)
}

fn content_length(head: &[String], what: &str) -> Result<u64> {
    header(head, "content-length")
        .ok_or_else(|| format!("{what}: response without Content-Length"))?
        .parse()
        .map_err(|_| format!("{what}: bad Content-Length"))
}

fn bulk_one(url: &Url, mode: BulkMode, seed: u64, len: u64, timeout: Duration) -> Result<BulkDone> {
    let stream = connect(url, timeout)?;
    let local = stream
        .local_addr()
        .map_err(|e| format!("local_addr: {e}"))?;
    let host = &url.host;
    let mut writer = stream
        .try_clone()
        .map_err(|e| format!("cloning stream: {e}"))?;
    let mut reader = BufReader::with_capacity(CHUNK, stream);
    let (mut sent, mut received) = (0, 0);
    let mut seen_head = None;
    if matches!(mode, BulkMode::UpDown | BulkMode::Up) {
        let what = format!("upload of {len} bytes");
        let connection = if mode == BulkMode::Up {
            "close"
        } else {
            "keep-alive"
        };
        let head = format!(
            "PUT /bytes?seed={seed} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: podserver\r\n\
             Content-Length: {len}\r\nConnection: {connection}\r\n\r\n"
        );
        writer
            .write_all(head.as_bytes())
            .and_then(|()| send_pattern(&mut writer, &mut Pattern::new(seed), len))
            .map_err(|e| format!("{what}: sending: {e}"))?;
        sent = len;
        let head = response_head(&mut reader, &what)?;
        let n = content_length(&head, &what)?.min(4096);
        let mut body = vec![0u8; n as usize];
        reader
            .read_exact(&mut body)
            .map_err(|e| format!("{what}: reading the answer: {e}"))?;
        let answer = String::from_utf8_lossy(&body);
        if answer.trim() != format!("ok {len}") {
            return Err(format!("{what}: the server answered {:?}", answer.trim()));
        }
        seen_head = Some(head);
    }
    if matches!(mode, BulkMode::UpDown | BulkMode::Down) {
        let what = format!("download of {len} bytes");
        let req = format!(
            "GET /bytes?size={len}&seed={} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: podserver\r\n\
             Connection: close\r\n\r\n",
            download_seed(seed)
        );
        writer
            .write_all(req.as_bytes())
            .map_err(|e| format!("{what}: sending the request: {e}"))?;
        let head = response_head(&mut reader, &what)?;
        let n = content_length(&head, &what)?;
        if n != len {
            return Err(format!("{what}: Content-Length {n}"));
        }
        received = receive_pattern(&mut reader, download_seed(seed), len, &what)?;
        seen_head.get_or_insert(head);
    }
    if mode == BulkMode::Echo {
        let what = format!("echo of {len} bytes");
        let head = format!(
            "POST /echo?seed={seed} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: podserver\r\n\
             Content-Length: {len}\r\nConnection: close\r\n\r\n"
        );
        let (head, got) = std::thread::scope(|s| {
            let sender = s.spawn(|| {
                writer
                    .write_all(head.as_bytes())
                    .and_then(|()| send_pattern(&mut writer, &mut Pattern::new(seed), len))
                    .map_err(|e| format!("{what}: sending: {e}"))
            });
            let got = response_head(&mut reader, &what).and_then(|head| {
                let n = content_length(&head, &what)?;
                if n != len {
                    return Err(format!("{what}: Content-Length {n}"));
                }
                Ok((head, receive_pattern(&mut reader, seed, len, &what)?))
            });
            if got.is_err() {
                // Unblock the sender if the echo broke.
                let _ = reader.get_ref().shutdown(std::net::Shutdown::Both);
            }
            let sent = sender
                .join()
                .unwrap_or_else(|_| Err(format!("{what}: sender panicked")));
            match (got, sent) {
                (Ok(ok), Ok(())) => Ok(ok),
                (Err(e), _) | (Ok(_), Err(e)) => Err(e),
            }
        })?;
        sent = len;
        received = got;
        seen_head = Some(head);
    }
    let head = seen_head.unwrap_or_default();
    Ok(BulkDone {
        pod: header(&head, "x-pod").unwrap_or("-").to_string(),
        client: header(&head, "x-client").unwrap_or("-").to_string(),
        local,
        sent,
        received,
    })
}

fn bulk(args: &[String]) -> Result<ExitCode> {
    let args = Args::parse(args, &[])?;
    args.check_known(&[
        "connections",
        "bytes",
        "seed",
        "mode",
        "timeout-ms",
        "deadline-ms",
    ])?;
    let [url] = args.positional.as_slice() else {
        return Err(format!("bulk needs one <url>\n{}", usage()));
    };
    let url = parse_url(url)?;
    let connections: usize = args.number("connections", 1)?;
    let len: u64 = args.number("bytes", 1 << 20)?;
    let seed: u64 = args.number("seed", 1)?;
    let timeout = Duration::from_millis(args.number("timeout-ms", 10_000)?);
    let modes: Vec<BulkMode> = match args.value("mode").unwrap_or("updown") {
        "updown" => vec![BulkMode::UpDown],
        "echo" => vec![BulkMode::Echo],
        "up" => vec![BulkMode::Up],
        "down" => vec![BulkMode::Down],
        "mixed" => vec![BulkMode::UpDown, BulkMode::Echo],
        other => return Err(format!("--mode: unknown mode {other:?}\n{}", usage())),
    };
    // A transfer that keeps trickling never trips the per-operation
    // timeout: the deadline bounds each connection as a whole.
    let deadline = Duration::from_millis(args.number("deadline-ms", 120_000)?);
    let url = Arc::new(url);
    let (tx, rx) = std::sync::mpsc::channel();
    let connections = connections.clamp(1, 64);
    for i in 0..connections {
        let mode = modes[i % modes.len()];
        let (url, tx) = (Arc::clone(&url), tx.clone());
        std::thread::spawn(move || {
            let start = std::time::Instant::now();
            let line = match bulk_one(&url, mode, seed.wrapping_add(i as u64), len, timeout) {
                Ok(d) => Ok(format!(
                    "OK\t{}\t{}\t{}\t{}\t{}\t{}\t{}",
                    mode.name(),
                    d.pod,
                    d.client,
                    d.local,
                    d.sent,
                    d.received,
                    start.elapsed().as_millis()
                )),
                Err(e) => Err(format!("ERR\t{}\t{e}", mode.name())),
            };
            let _ = tx.send((i, line));
        });
    }
    drop(tx);
    let end = std::time::Instant::now() + deadline;
    let mut done = vec![false; connections];
    let mut failed = 0;
    let mut out = std::io::stdout();
    while done.iter().any(|d| !d) {
        let left = end.saturating_duration_since(std::time::Instant::now());
        let Ok((i, line)) = rx.recv_timeout(left) else {
            break;
        };
        done[i] = true;
        let line = line.unwrap_or_else(|e| {
            failed += 1;
            e
        });
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    }
    for (i, _) in done.iter().enumerate().filter(|(_, d)| !**d) {
        failed += 1;
        let _ = writeln!(
            out,
            "ERR\t{}\tnot finished within {deadline:?} (stalled or crawling)",
            modes[i % modes.len()].name()
        );
    }
    let _ = out.flush();
    if failed > 0 {
        // Unfinished transfers may still be blocked: do not wait for them.
        std::process::exit(1);
    }
    Ok(ExitCode::SUCCESS)
}
