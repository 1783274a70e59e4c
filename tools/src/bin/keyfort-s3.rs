//! `keyfort-s3`: a small S3 server for tests and the demo (DESIGN.md "Durable store").
//!
//! Objects live on disk under `--root` through `s3s-fs`; every directory under the root is a
//! bucket (`--bucket NAME` creates one). It listens on loopback only and prints one line,
//! `keyfort-s3 listening on 127.0.0.1:PORT`, once it accepts connections.
//!
//! What it adds to `s3s-fs`:
//! - TCP_NODELAY on every accepted socket: without it a small GET stalls ~40 ms on Nagle plus the
//!   client's delayed ACK.
//! - Conditional creates that are atomic. `s3s-fs` 0.14.1 honours `If-None-Match: *` on
//!   PutObject and CompleteMultipartUpload (412 PreconditionFailed when the key exists), but it
//!   checks and then renames, so two racing creates could both pass. Requests carrying
//!   `If-None-Match` are serialized per key here (striped locks, [`CREATE_LOCK_STRIPES`]) so the
//!   check and the rename of one cannot interleave with another's. An unconditional PUT is not
//!   serialized and can still overwrite; keyfort never sends one.
//! - `--fault-cut-get-every K` (tests only): every K-th GET whose body is larger than
//!   [`FAULT_BODY_BYTES_MIN`] is cut after half its body and the connection dropped, so clients
//!   must resume.
//!
//! Not durable: `s3s-fs` does not fsync. It is a test server, not a store for real backups.

use std::collections::hash_map::DefaultHasher;
use std::future::Future;
use std::hash::{Hash, Hasher};
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use clap::Parser;
use http::{Method, Request, Response};
use http_body::{Body as _, Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder as ConnBuilder;
use s3s::auth::SimpleAuth;
use s3s::service::{S3Service, S3ServiceBuilder};
use s3s::{Body, HttpError, StdError};
use tokio::sync::Mutex;

/// Stripes of the per-key lock that serializes conditional creates (a key maps to one stripe;
/// two keys sharing a stripe only wait for each other).
const CREATE_LOCK_STRIPES: usize = 64;
/// `--fault-cut-get-every` only cuts GET bodies larger than this (lists and small objects pass).
const FAULT_BODY_BYTES_MIN: u64 = 64 << 10;

#[derive(Debug, Parser)]
#[command(
    name = "keyfort-s3",
    about = "A small S3 server for keyfort's tests and demo (loopback only)"
)]
struct Opt {
    /// Directory holding the buckets (one directory each) and their objects.
    #[arg(long)]
    root: PathBuf,
    /// Address to listen on; must be a loopback address. Port 0 picks a free port.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: String,
    /// Access key id clients sign with.
    #[arg(long, env = "KEYFORT_S3_ACCESS_KEY")]
    access_key: String,
    /// Secret access key clients sign with.
    #[arg(long, env = "KEYFORT_S3_SECRET_KEY", hide_env_values = true)]
    secret_key: String,
    /// Create this bucket (a directory under --root) if missing; repeatable.
    #[arg(long)]
    bucket: Vec<String>,
    /// TESTS ONLY: cut every K-th GET with a body over 64 KiB after half its body.
    #[arg(long, value_name = "K", value_parser = clap::value_parser!(u64).range(1..))]
    fault_cut_get_every: Option<u64>,
}

fn loopback_addr(listen: &str) -> Result<SocketAddr, String> {
    let addr: SocketAddr = listen
        .parse()
        .map_err(|e| format!("--listen {listen:?}: expected IP:PORT ({e})"))?;
    if !addr.ip().is_loopback() {
        return Err(format!(
            "--listen {listen}: keyfort-s3 is a test server and listens on loopback only \
             (127.0.0.1 or [::1])"
        ));
    }
    Ok(addr)
}

/// Counts large GETs and decides which to cut.
struct Fault {
    every: u64,
    seen: AtomicU64,
}

/// The S3 service with per-key serialization of conditional creates and optional GET faults.
#[derive(Clone)]
struct Gate {
    inner: S3Service,
    stripes: Arc<Vec<Arc<Mutex<()>>>>,
    fault: Option<Arc<Fault>>,
}

impl Gate {
    fn create_lock(&self, req: &Request<Incoming>) -> Option<Arc<Mutex<()>>> {
        let writes = req.method() == Method::PUT || req.method() == Method::POST;
        if !writes || !req.headers().contains_key(http::header::IF_NONE_MATCH) {
            return None;
        }
        let mut h = DefaultHasher::new();
        req.uri().path().hash(&mut h);
        Some(Arc::clone(
            &self.stripes[(h.finish() % CREATE_LOCK_STRIPES as u64) as usize],
        ))
    }
}

fn body_len(resp: &Response<Body>) -> Option<u64> {
    let header = resp
        .headers()
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    header.or_else(|| resp.body().size_hint().exact())
}

impl hyper::service::Service<Request<Incoming>> for Gate {
    type Response = Response<Body>;
    type Error = HttpError;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, HttpError>> + Send>>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        let lock = self.create_lock(&req);
        let is_get = req.method() == Method::GET;
        let fault = self.fault.clone();
        let response = hyper::service::Service::call(&self.inner, req);
        Box::pin(async move {
            let _guard = match lock {
                Some(stripe) => Some(stripe.lock_owned().await),
                None => None,
            };
            let resp = response.await?;
            let Some(fault) = fault.filter(|_| is_get && resp.status().is_success()) else {
                return Ok(resp);
            };
            let Some(len) = body_len(&resp).filter(|&l| l > FAULT_BODY_BYTES_MIN) else {
                return Ok(resp);
            };
            if (fault.seen.fetch_add(1, Ordering::Relaxed) + 1) % fault.every != 0 {
                return Ok(resp);
            }
            Ok(resp.map(|body| {
                Body::http_body_unsync(CutBody {
                    inner: body,
                    left: len / 2,
                })
            }))
        })
    }
}

/// A body that passes `left` bytes, then fails, which makes hyper drop the connection.
struct CutBody {
    inner: Body,
    left: u64,
}

impl http_body::Body for CutBody {
    type Data = Bytes;
    type Error = StdError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, StdError>>> {
        if self.left == 0 {
            return Poll::Ready(Some(
                Err("keyfort-s3: fault injection cut this body".into()),
            ));
        }
        let frame = match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => frame,
            other => return other,
        };
        let Ok(mut data) = frame.into_data() else {
            return Poll::Ready(Some(Err("keyfort-s3: trailers in a cut body".into())));
        };
        let take = (data.len() as u64).min(self.left);
        self.left -= take;
        data.truncate(take as usize);
        Poll::Ready(Some(Ok(Frame::data(data))))
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

fn build_gate(opt: &Opt) -> Result<Gate, String> {
    for bucket in &opt.bucket {
        let charset = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-';
        if !(3..=63).contains(&bucket.len()) || !bucket.chars().all(charset) {
            return Err(format!(
                "--bucket {bucket:?}: an S3 bucket name is 3 to 63 of a-z, 0-9 and -"
            ));
        }
        let dir = opt.root.join(bucket);
        std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    }
    let fs = s3s_fs::FileSystem::new(&opt.root)
        .map_err(|e| format!("--root {}: {e:?}", opt.root.display()))?;
    let mut builder = S3ServiceBuilder::new(fs);
    builder.set_auth(SimpleAuth::from_single(
        opt.access_key.clone(),
        opt.secret_key.clone(),
    ));
    let stripes = (0..CREATE_LOCK_STRIPES)
        .map(|_| Arc::new(Mutex::new(())))
        .collect();
    Ok(Gate {
        inner: builder.build(),
        stripes: Arc::new(stripes),
        fault: opt.fault_cut_get_every.map(|every| {
            Arc::new(Fault {
                every,
                seen: AtomicU64::new(0),
            })
        }),
    })
}

async fn serve(opt: Opt) -> Result<(), String> {
    let addr = loopback_addr(&opt.listen)?;
    std::fs::create_dir_all(&opt.root)
        .map_err(|e| format!("creating {}: {e}", opt.root.display()))?;
    let gate = build_gate(&opt)?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| format!("binding {addr}: {e}"))?;
    let local = listener.local_addr().map_err(|e| e.to_string())?;
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).map_err(|e| format!("SIGTERM: {e}"))?;
    let mut int = signal(SignalKind::interrupt()).map_err(|e| format!("SIGINT: {e}"))?;
    let mut stdout = std::io::stdout();
    writeln!(stdout, "keyfort-s3 listening on {local}")
        .and_then(|()| stdout.flush())
        .map_err(|e| format!("stdout: {e}"))?;
    let http = ConnBuilder::new(TokioExecutor::new());
    loop {
        let socket = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((socket, _)) => socket,
                Err(e) => {
                    eprintln!("keyfort-s3: accept: {e}");
                    continue;
                }
            },
            _ = term.recv() => return Ok(()),
            _ = int.recv() => return Ok(()),
        };
        if let Err(e) = socket.set_nodelay(true) {
            eprintln!("keyfort-s3: TCP_NODELAY: {e}");
        }
        let (http, gate) = (http.clone(), gate.clone());
        tokio::spawn(async move {
            let _ = http.serve_connection(TokioIo::new(socket), gate).await;
        });
    }
}

fn main() {
    let opt = Opt::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap_or_else(|e| {
            eprintln!("keyfort-s3: tokio runtime: {e}");
            std::process::exit(1);
        });
    if let Err(e) = runtime.block_on(serve(opt)) {
        eprintln!("keyfort-s3: {e}");
        std::process::exit(2);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_addresses_are_accepted() {
        assert!(loopback_addr("127.0.0.1:0").is_ok());
        assert!(loopback_addr("[::1]:9000").is_ok());
        assert!(loopback_addr("0.0.0.0:9000").is_err());
        assert!(loopback_addr("10.1.2.3:9000").is_err());
        assert!(loopback_addr("localhost:9000").is_err());
    }
}
