//! The durable store (DESIGN.md "Durable store"): S3 or a local directory through
//! `object_store`, on one dedicated tokio thread.
//!
//! `object_store` is a tokio library; keyfort's shard cores run glommio. A [`DurableStore`] owns
//! one OS thread (`keyfort-durable`) running a **current-thread** tokio runtime, and every method
//! sends a job to it over a bounded channel and awaits the answer on a oneshot. Both channels are
//! `tokio::sync` primitives, which need no tokio runtime on the waiting side, so a method can be
//! awaited from a glommio executor or driven by `futures_lite::future::block_on` on a plain
//! thread (the CLI).
//!
//! Why current-thread and not a multi-thread runtime: the durable thread mostly waits on sockets
//! (object storage is latency-, not CPU-bound, and one thread parses HTTP at several hundred MB/s),
//! and keyfort runs one executor per core: a second busy tokio worker would steal a shard core.
//! Blocking file I/O (reading a file to upload, writing fetched parts, fsync) goes to tokio's
//! blocking pool, capped at [`BLOCKING_THREADS_MAX`], so it never stalls the reactor.
//!
//! Objects are immutable: every write is a conditional create that never overwrites
//! (`PutMode::Create`). For a local directory it is native (a hard link that fails on EEXIST);
//! for S3 it is `If-None-Match: *` (`S3ConditionalPut::ETagMatch`). `object_store` 0.11 completes
//! multipart uploads unconditionally, so a large file is uploaded under [`STAGING_PREFIX`] and then
//! copied to its key with `copy_if_not_exists` (`S3CopyIfNotExists::Multipart`: one
//! UploadPartCopy and a completion carrying `If-None-Match: *`); the staged object is then deleted.
//! On AWS a single UploadPartCopy is limited to 5 GiB, so that is the largest file
//! [`DurableStore::put_file_create`] can create there.

use std::future::Future;
use std::os::unix::fs::FileExt;
use std::path::{Path as FsPath, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::stream::{StreamExt, TryStreamExt};
use object_store::aws::{AmazonS3Builder, S3ConditionalPut, S3CopyIfNotExists};
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjPath;
use object_store::prefix::PrefixStore;
use object_store::{
    BackoffConfig, ClientOptions, GetOptions, GetRange, ObjectStore, PutMode, PutOptions,
    PutPayload, RetryConfig, WriteMultipart,
};
use tokio::sync::{mpsc, oneshot};

/// Jobs waiting for the durable thread; a caller past this many waits (backpressure) instead of
/// queueing without bound.
pub const JOB_QUEUE_DEPTH: usize = 64;
/// Jobs running at once on the durable thread; past it the thread stops taking jobs, the queue
/// fills and callers wait. Bounds memory: a job holds at most one file part or small file.
pub const JOBS_IN_FLIGHT_MAX: usize = 16;
/// Threads in the durable runtime's blocking pool (file reads, part writes, fsync).
pub const BLOCKING_THREADS_MAX: usize = 4;
/// Files up to this size are created with one PUT; larger ones go multipart.
pub const PUT_SINGLE_BYTES_MAX: u64 = 8 << 20;
/// Part size of a multipart upload (S3 needs at least 5 MiB for every part but the last).
pub const UPLOAD_PART_BYTES: usize = 8 << 20;
/// Parts of one multipart upload in flight at once (memory: this × [`UPLOAD_PART_BYTES`]).
pub const UPLOAD_PARALLEL: usize = 4;
/// Largest object [`DurableStore::get_bytes`] reads into memory; use `get_to_file` above it.
pub const GET_BYTES_MAX: u64 = 256 << 20;
/// Most keys one [`DurableStore::list`] returns before failing with [`StoreError::TooMany`].
pub const LIST_KEYS_MAX: usize = 1_000_000;
/// Default part size of [`DurableStore::get_to_file`].
pub const FETCH_PART_BYTES_DEFAULT: u64 = 8 << 20;
/// Bounds of [`FetchOptions::part_bytes`] (each part is buffered whole before it is written).
pub const FETCH_PART_BYTES_MIN: u64 = 4 << 10;
pub const FETCH_PART_BYTES_MAX: u64 = 64 << 20;
/// Default and largest number of ranged GETs in flight (memory: parallel × part_bytes).
pub const FETCH_PARALLEL_DEFAULT: usize = 8;
pub const FETCH_PARALLEL_MAX: usize = 32;
/// Default and largest number of resumes of one part.
pub const FETCH_RETRIES_DEFAULT: u32 = 5;
pub const FETCH_RETRIES_MAX: u32 = 100;
/// Pause before the n-th resume of a part: n × this.
pub const FETCH_RESUME_BACKOFF: Duration = Duration::from_millis(20);
/// HTTP: connect timeout, whole-request timeout, and `object_store`'s own retries of a request
/// that failed before its body started (a cut body is resumed by `get_to_file`, not there).
pub const HTTP_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
pub const HTTP_REQUEST_TIMEOUT: Duration = Duration::from_secs(120);
pub const HTTP_RETRIES_MAX: usize = 3;
pub const HTTP_RETRY_TIMEOUT: Duration = Duration::from_secs(30);
/// Where large files are staged before their conditional copy; hidden from [`DurableStore::list`].
pub const STAGING_PREFIX: &str = "_keyfort-staging";
/// Env var naming a file of two lines: access key id, secret access key.
pub const CREDENTIALS_FILE_ENV: &str = "KEYFORT_S3_CREDENTIALS";
/// Region used when the URL names none (the test server ignores it).
pub const REGION_DEFAULT: &str = "us-east-1";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    #[error("durable store: no object {key}")]
    NotFound { key: String },
    #[error("durable store: object {key} already exists")]
    AlreadyExists { key: String },
    #[error("durable store: bad URL {url}: {reason}")]
    BadUrl { url: String, reason: String },
    #[error("durable store: bad key {key:?}: {reason}")]
    BadKey { key: String, reason: String },
    #[error("durable store: S3 credentials: {reason}")]
    Credentials { reason: String },
    #[error("durable store: bad fetch options: {reason}")]
    BadOptions { reason: String },
    #[error("durable store: {key}: {reason}")]
    Io { key: String, reason: String },
    #[error("durable store: {key}: expected {expected} bytes, got {got}")]
    Short {
        key: String,
        expected: u64,
        got: u64,
    },
    #[error("durable store: {key} is {size} bytes, more than {max} for an in-memory get")]
    TooLarge { key: String, size: u64, max: u64 },
    #[error("durable store: more than {max} keys under {prefix:?}")]
    TooMany { prefix: String, max: usize },
    #[error("durable store: the durable thread is gone: {reason}")]
    Stopped { reason: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutOutcome {
    Created,
    AlreadyExists,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FetchOptions {
    pub part_bytes: u64,
    pub parallel: usize,
    pub retries: u32,
}

impl Default for FetchOptions {
    fn default() -> Self {
        FetchOptions {
            part_bytes: FETCH_PART_BYTES_DEFAULT,
            parallel: FETCH_PARALLEL_DEFAULT,
            retries: FETCH_RETRIES_DEFAULT,
        }
    }
}

impl FetchOptions {
    fn check(&self) -> Result<(), StoreError> {
        let bad = |reason: String| Err(StoreError::BadOptions { reason });
        if !(FETCH_PART_BYTES_MIN..=FETCH_PART_BYTES_MAX).contains(&self.part_bytes) {
            return bad(format!(
                "part_bytes {} outside {FETCH_PART_BYTES_MIN}..={FETCH_PART_BYTES_MAX}",
                self.part_bytes
            ));
        }
        if !(1..=FETCH_PARALLEL_MAX).contains(&self.parallel) {
            return bad(format!(
                "parallel {} outside 1..={FETCH_PARALLEL_MAX}",
                self.parallel
            ));
        }
        if self.retries > FETCH_RETRIES_MAX {
            return bad(format!(
                "retries {} above {FETCH_RETRIES_MAX}",
                self.retries
            ));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FetchReport {
    pub bytes: u64,
    pub parts: u64,
    pub resumed_parts: u64,
    pub elapsed: Duration,
}

/// S3 credentials: from the environment or a file ([`S3Credentials::from_env`]).
#[derive(Clone, PartialEq, Eq)]
pub struct S3Credentials {
    pub access_key_id: String,
    pub secret_access_key: String,
}

impl std::fmt::Debug for S3Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Credentials")
            .field("access_key_id", &self.access_key_id)
            .finish_non_exhaustive()
    }
}

impl S3Credentials {
    /// `AWS_ACCESS_KEY_ID` and `AWS_SECRET_ACCESS_KEY` when both are set, else the file named by
    /// `KEYFORT_S3_CREDENTIALS`.
    pub fn from_env() -> Result<S3Credentials, StoreError> {
        let id = std::env::var("AWS_ACCESS_KEY_ID").ok();
        let secret = std::env::var("AWS_SECRET_ACCESS_KEY").ok();
        if let (Some(access_key_id), Some(secret_access_key)) = (id, secret) {
            return Ok(S3Credentials {
                access_key_id,
                secret_access_key,
            });
        }
        match std::env::var_os(CREDENTIALS_FILE_ENV) {
            Some(path) => S3Credentials::from_file(FsPath::new(&path)),
            None => Err(StoreError::Credentials {
                reason: format!(
                    "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or {CREDENTIALS_FILE_ENV}"
                ),
            }),
        }
    }

    /// A file of two lines: the access key id, then the secret access key.
    pub fn from_file(path: &FsPath) -> Result<S3Credentials, StoreError> {
        let text = std::fs::read_to_string(path).map_err(|e| StoreError::Credentials {
            reason: format!("{}: {e}", path.display()),
        })?;
        let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
        match (lines.next(), lines.next(), lines.next()) {
            (Some(id), Some(secret), None) => Ok(S3Credentials {
                access_key_id: id.to_string(),
                secret_access_key: secret.to_string(),
            }),
            _ => Err(StoreError::Credentials {
                reason: format!(
                    "{}: expected two lines (access key id, secret)",
                    path.display()
                ),
            }),
        }
    }
}

type BoxFuture = Pin<Box<dyn Future<Output = ()> + Send>>;
type Job = Box<dyn FnOnce(Backend) -> BoxFuture + Send>;

/// What a job runs against, on the durable thread.
#[derive(Clone)]
struct Backend {
    store: Arc<dyn ObjectStore>,
    /// The directory of a local store: created objects are fsynced there (object_store's
    /// LocalFileSystem does not fsync).
    local_root: Option<PathBuf>,
}

struct Inner {
    url: String,
    jobs: mpsc::Sender<Job>,
}

/// A handle on the durable store; cheap to clone. The durable thread stops when the last clone
/// is dropped (its job channel closes).
#[derive(Clone)]
pub struct DurableStore {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for DurableStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DurableStore")
            .field("url", &self.inner.url)
            .finish()
    }
}

enum Location {
    Local(PathBuf),
    S3 {
        bucket: String,
        prefix: String,
        endpoint: Option<String>,
        region: String,
    },
}

fn parse_url(url: &str) -> Result<Location, StoreError> {
    let bad = |reason: &str| StoreError::BadUrl {
        url: url.to_string(),
        reason: reason.to_string(),
    };
    if let Some(path) = url.strip_prefix("file://") {
        if !path.starts_with('/') {
            return Err(bad("file:// needs an absolute path (file:///abs/dir)"));
        }
        return Ok(Location::Local(PathBuf::from(path)));
    }
    let Some(rest) = url.strip_prefix("s3://") else {
        if url.is_empty() || url.contains("://") {
            return Err(bad("expected file:///dir, a path, or s3://bucket[/prefix]"));
        }
        return Ok(Location::Local(PathBuf::from(url)));
    };
    let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
    let (bucket, prefix) = path.split_once('/').unwrap_or((path, ""));
    if bucket.is_empty() {
        return Err(bad("no bucket"));
    }
    let (mut endpoint, mut region) = (None, REGION_DEFAULT.to_string());
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("endpoint", v)) if !v.is_empty() => endpoint = Some(v.to_string()),
            Some(("region", v)) if !v.is_empty() => region = v.to_string(),
            _ => return Err(bad(&format!("unknown or empty query parameter {pair:?}"))),
        }
    }
    Ok(Location::S3 {
        bucket: bucket.to_string(),
        prefix: prefix.trim_matches('/').to_string(),
        endpoint,
        region,
    })
}

fn build_backend(url: &str, creds: Option<S3Credentials>) -> Result<Backend, StoreError> {
    let store_err = |e: object_store::Error| StoreError::BadUrl {
        url: url.to_string(),
        reason: e.to_string(),
    };
    match parse_url(url)? {
        Location::Local(dir) => {
            std::fs::create_dir_all(&dir).map_err(|e| StoreError::BadUrl {
                url: url.to_string(),
                reason: format!("creating {}: {e}", dir.display()),
            })?;
            let root = std::fs::canonicalize(&dir).map_err(|e| StoreError::BadUrl {
                url: url.to_string(),
                reason: e.to_string(),
            })?;
            let store = LocalFileSystem::new_with_prefix(&root).map_err(store_err)?;
            Ok(Backend {
                store: Arc::new(store),
                local_root: Some(root),
            })
        }
        Location::S3 {
            bucket,
            prefix,
            endpoint,
            region,
        } => {
            let creds = match creds {
                Some(c) => c,
                None => S3Credentials::from_env()?,
            };
            let retry = RetryConfig {
                backoff: BackoffConfig::default(),
                max_retries: HTTP_RETRIES_MAX,
                retry_timeout: HTTP_RETRY_TIMEOUT,
            };
            let client = ClientOptions::new()
                .with_allow_http(true)
                .with_connect_timeout(HTTP_CONNECT_TIMEOUT)
                .with_timeout(HTTP_REQUEST_TIMEOUT);
            let mut builder = AmazonS3Builder::new()
                .with_bucket_name(&bucket)
                .with_region(&region)
                .with_access_key_id(&creds.access_key_id)
                .with_secret_access_key(&creds.secret_access_key)
                .with_conditional_put(S3ConditionalPut::ETagMatch)
                .with_copy_if_not_exists(S3CopyIfNotExists::Multipart)
                .with_retry(retry)
                .with_client_options(client);
            if let Some(endpoint) = endpoint {
                builder = builder.with_endpoint(endpoint).with_allow_http(true);
            }
            let s3 = builder.build().map_err(store_err)?;
            let store: Arc<dyn ObjectStore> = if prefix.is_empty() {
                Arc::new(s3)
            } else {
                Arc::new(PrefixStore::new(s3, prefix.as_str()))
            };
            Ok(Backend {
                store,
                local_root: None,
            })
        }
    }
}

fn obj_path(key: &str) -> Result<ObjPath, StoreError> {
    if key.is_empty() {
        return Err(StoreError::BadKey {
            key: key.to_string(),
            reason: "empty".to_string(),
        });
    }
    ObjPath::parse(key).map_err(|e| StoreError::BadKey {
        key: key.to_string(),
        reason: e.to_string(),
    })
}

fn map_err(key: &str, e: object_store::Error) -> StoreError {
    match e {
        object_store::Error::NotFound { .. } => StoreError::NotFound {
            key: key.to_string(),
        },
        object_store::Error::AlreadyExists { .. } | object_store::Error::Precondition { .. } => {
            StoreError::AlreadyExists {
                key: key.to_string(),
            }
        }
        other => StoreError::Io {
            key: key.to_string(),
            reason: other.to_string(),
        },
    }
}

fn io_err(key: &str, what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Io {
        key: key.to_string(),
        reason: format!("{what}: {e}"),
    }
}

/// Runs blocking file work on the durable runtime's blocking pool.
async fn blocking<T: Send + 'static>(
    key: &str,
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> Result<T, StoreError> {
    match tokio::task::spawn_blocking(f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(io_err(key, "file", e)),
        Err(e) => Err(io_err(key, "blocking task", e)),
    }
}

fn create_outcome(r: Result<(), StoreError>) -> Result<PutOutcome, StoreError> {
    match r {
        Ok(()) => Ok(PutOutcome::Created),
        Err(StoreError::AlreadyExists { .. }) => Ok(PutOutcome::AlreadyExists),
        Err(e) => Err(e),
    }
}

impl Backend {
    /// fsync a newly created local object and its directory (no-op for S3).
    async fn sync_created(&self, key: &str) -> Result<(), StoreError> {
        let Some(root) = &self.local_root else {
            return Ok(());
        };
        let file = root.join(key);
        blocking(key, move || {
            std::fs::File::open(&file)?.sync_all()?;
            match file.parent() {
                Some(dir) => std::fs::File::open(dir)?.sync_all(),
                None => Ok(()),
            }
        })
        .await
    }

    async fn put_create(&self, key: &str, payload: PutPayload) -> Result<(), StoreError> {
        let path = obj_path(key)?;
        let opts = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        self.store
            .put_opts(&path, payload, opts)
            .await
            .map_err(|e| map_err(key, e))?;
        self.sync_created(key).await
    }

    /// Multipart upload of `file` to a staging key, then a conditional copy to `key`.
    async fn put_large_create(
        &self,
        key: &str,
        file: Arc<std::fs::File>,
        size: u64,
    ) -> Result<(), StoreError> {
        let path = obj_path(key)?;
        // Fast path only: an existing key is not uploaded again. The conditional copy below is
        // what guarantees that nothing is overwritten.
        if self.head(key).await?.is_some() {
            return Err(StoreError::AlreadyExists {
                key: key.to_string(),
            });
        }
        let staging_key = staging_key(key);
        let staging = obj_path(&staging_key)?;
        let upload = self
            .store
            .put_multipart(&staging)
            .await
            .map_err(|e| map_err(&staging_key, e))?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, UPLOAD_PART_BYTES);
        let mut offset = 0u64;
        while offset < size {
            let len = (size - offset).min(UPLOAD_PART_BYTES as u64) as usize;
            let chunk = read_chunk(key, Arc::clone(&file), offset, len).await;
            let waited = match chunk {
                Ok(chunk) => {
                    writer.put(chunk.into());
                    writer.wait_for_capacity(UPLOAD_PARALLEL).await
                }
                Err(e) => {
                    let _ = writer.abort().await;
                    return Err(e);
                }
            };
            if let Err(e) = waited {
                let _ = writer.abort().await;
                return Err(map_err(key, e));
            }
            offset += len as u64;
        }
        writer.finish().await.map_err(|e| map_err(key, e))?;
        let copied = self
            .store
            .copy_if_not_exists(&staging, &path)
            .await
            .map_err(|e| map_err(key, e));
        // Best effort: a staged object left behind is hidden from list and harmless.
        let _ = self.store.delete(&staging).await;
        copied?;
        self.sync_created(key).await
    }

    async fn put_file_create(&self, key: &str, path: PathBuf) -> Result<(), StoreError> {
        let file = blocking(key, move || std::fs::File::open(path)).await?;
        let file = Arc::new(file);
        let size = {
            let file = Arc::clone(&file);
            blocking(key, move || file.metadata().map(|m| m.len())).await?
        };
        if size <= PUT_SINGLE_BYTES_MAX {
            let bytes = read_chunk(key, file, 0, size as usize).await?;
            return self.put_create(key, bytes.into()).await;
        }
        self.put_large_create(key, file, size).await
    }

    async fn get_bytes(&self, key: &str) -> Result<Vec<u8>, StoreError> {
        let path = obj_path(key)?;
        let got = self.store.get(&path).await.map_err(|e| map_err(key, e))?;
        let size = got.meta.size as u64;
        if size > GET_BYTES_MAX {
            return Err(StoreError::TooLarge {
                key: key.to_string(),
                size,
                max: GET_BYTES_MAX,
            });
        }
        let bytes = got.bytes().await.map_err(|e| map_err(key, e))?;
        if bytes.len() as u64 != size {
            return Err(StoreError::Short {
                key: key.to_string(),
                expected: size,
                got: bytes.len() as u64,
            });
        }
        Ok(bytes.to_vec())
    }

    async fn head(&self, key: &str) -> Result<Option<u64>, StoreError> {
        let path = obj_path(key)?;
        match self.store.head(&path).await {
            Ok(meta) => Ok(Some(meta.size as u64)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(map_err(key, e)),
        }
    }

    async fn list(&self, prefix: &str) -> Result<Vec<(String, u64)>, StoreError> {
        // object_store lists whole path segments; list the prefix's directory and filter, so
        // `snap/sh` matches `snap/shard-1/...` as a plain string prefix would.
        let dir = match prefix.rfind('/') {
            Some(i) => Some(obj_path(&prefix[..i])?),
            None => None,
        };
        let mut stream = self.store.list(dir.as_ref());
        let mut out = Vec::new();
        loop {
            let meta = match stream.try_next().await {
                Ok(Some(meta)) => meta,
                Ok(None) | Err(object_store::Error::NotFound { .. }) => break,
                Err(e) => return Err(map_err(prefix, e)),
            };
            let key = meta.location.to_string();
            if !key.starts_with(prefix) || key.starts_with(STAGING_PREFIX) {
                continue;
            }
            if out.len() == LIST_KEYS_MAX {
                return Err(StoreError::TooMany {
                    prefix: prefix.to_string(),
                    max: LIST_KEYS_MAX,
                });
            }
            out.push((key, meta.size as u64));
        }
        out.sort();
        Ok(out)
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        let path = obj_path(key)?;
        match self.store.delete(&path).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(map_err(key, e)),
        }
    }

    async fn get_to_file(
        &self,
        key: &str,
        dest: PathBuf,
        opts: FetchOptions,
    ) -> Result<FetchReport, StoreError> {
        opts.check()?;
        let started = Instant::now();
        let path = obj_path(key)?;
        let size = self
            .store
            .head(&path)
            .await
            .map_err(|e| map_err(key, e))?
            .size as u64;
        let file = blocking(key, move || {
            let file = std::fs::File::create(&dest)?;
            file.set_len(size)?;
            Ok(file)
        })
        .await?;
        let file = Arc::new(file);
        let parts = size.div_ceil(opts.part_bytes);
        let resumed = AtomicU64::new(0);
        futures::stream::iter(0..parts)
            .map(|i| {
                let start = i * opts.part_bytes;
                let end = (start + opts.part_bytes).min(size);
                self.fetch_part(
                    key,
                    &path,
                    Arc::clone(&file),
                    start..end,
                    opts.retries,
                    &resumed,
                )
            })
            .buffer_unordered(opts.parallel)
            .try_collect::<()>()
            .await?;
        let synced = Arc::clone(&file);
        let len = blocking(key, move || {
            synced.sync_all()?;
            synced.metadata().map(|m| m.len())
        })
        .await?;
        if len != size {
            return Err(StoreError::Short {
                key: key.to_string(),
                expected: size,
                got: len,
            });
        }
        Ok(FetchReport {
            bytes: size,
            parts,
            resumed_parts: resumed.load(Ordering::Relaxed),
            elapsed: started.elapsed(),
        })
    }

    /// One part: ranged GETs until `range` is whole, each resume asking from the first byte not
    /// yet received; then one positioned write.
    async fn fetch_part(
        &self,
        key: &str,
        path: &ObjPath,
        file: Arc<std::fs::File>,
        range: std::ops::Range<u64>,
        retries: u32,
        resumed: &AtomicU64,
    ) -> Result<(), StoreError> {
        let want = range.end - range.start;
        let mut buf: Vec<u8> = Vec::with_capacity(want as usize);
        let mut attempts = 0u32;
        loop {
            let from = range.start + buf.len() as u64;
            let got = self.read_range(key, path, from..range.end, &mut buf).await;
            if buf.len() as u64 > want {
                return Err(io_err(key, "ranged GET", "longer than the range asked"));
            }
            if buf.len() as u64 == want {
                break;
            }
            if attempts == retries {
                return Err(match got {
                    Err(e) => e,
                    Ok(()) => StoreError::Short {
                        key: key.to_string(),
                        expected: want,
                        got: buf.len() as u64,
                    },
                });
            }
            if attempts == 0 {
                resumed.fetch_add(1, Ordering::Relaxed);
            }
            attempts += 1;
            tokio::time::sleep(FETCH_RESUME_BACKOFF * attempts).await;
        }
        let offset = range.start;
        blocking(key, move || file.write_all_at(&buf, offset)).await
    }

    /// Appends what one ranged GET returns to `buf`; an error mid-body keeps what came before.
    async fn read_range(
        &self,
        key: &str,
        path: &ObjPath,
        range: std::ops::Range<u64>,
        buf: &mut Vec<u8>,
    ) -> Result<(), StoreError> {
        let opts = GetOptions {
            range: Some(GetRange::Bounded(range.start as usize..range.end as usize)),
            ..Default::default()
        };
        let got = self
            .store
            .get_opts(path, opts)
            .await
            .map_err(|e| map_err(key, e))?;
        let mut stream = got.into_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| map_err(key, e))?;
            buf.extend_from_slice(&chunk);
        }
        Ok(())
    }
}

async fn read_chunk(
    key: &str,
    file: Arc<std::fs::File>,
    offset: u64,
    len: usize,
) -> Result<Vec<u8>, StoreError> {
    blocking(key, move || {
        let mut buf = vec![0u8; len];
        file.read_exact_at(&mut buf, offset)?;
        Ok(buf)
    })
    .await
}

fn staging_key(key: &str) -> String {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let seq = SEQ.fetch_add(1, Ordering::Relaxed);
    format!(
        "{STAGING_PREFIX}/{key}.{}-{nanos}-{seq}",
        std::process::id()
    )
}

impl DurableStore {
    /// URL forms: `file:///abs/dir` or a plain path (local directory, created if missing);
    /// `s3://bucket[/prefix]?endpoint=http://127.0.0.1:PORT[&region=..]` — credentials from env
    /// AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, or from a file named by env KEYFORT_S3_CREDENTIALS
    /// (two lines: access key id, secret). http endpoints allowed. Keys passed to methods are
    /// relative to the URL's prefix.
    pub fn open(url: &str) -> Result<DurableStore, StoreError> {
        DurableStore::open_with(url, None)
    }

    /// [`DurableStore::open`] with explicit S3 credentials (`None`: from the environment).
    pub fn open_with(url: &str, creds: Option<S3Credentials>) -> Result<DurableStore, StoreError> {
        let stopped = |e: std::io::Error| StoreError::Stopped {
            reason: e.to_string(),
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .max_blocking_threads(BLOCKING_THREADS_MAX)
            .thread_name("keyfort-durable-io")
            .build()
            .map_err(stopped)?;
        let backend = {
            let _guard = rt.enter();
            build_backend(url, creds)?
        };
        let (jobs, mut queue) = mpsc::channel::<Job>(JOB_QUEUE_DEPTH);
        std::thread::Builder::new()
            .name("keyfort-durable".to_string())
            .spawn(move || {
                rt.block_on(async move {
                    let slots = Arc::new(tokio::sync::Semaphore::new(JOBS_IN_FLIGHT_MAX));
                    while let Some(job) = queue.recv().await {
                        let Ok(slot) = Arc::clone(&slots).acquire_owned().await else {
                            return; // never closed
                        };
                        let work = job(backend.clone());
                        tokio::spawn(async move {
                            work.await;
                            drop(slot);
                        });
                    }
                });
            })
            .map_err(stopped)?;
        Ok(DurableStore {
            inner: Arc::new(Inner {
                url: url.to_string(),
                jobs,
            }),
        })
    }

    pub fn url(&self) -> &str {
        &self.inner.url
    }

    /// Runs `f` on the durable thread and awaits its answer from any executor.
    async fn run<T, F, Fut>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(Backend) -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, StoreError>> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move |backend| {
            Box::pin(async move {
                let _ = tx.send(f(backend).await);
            })
        });
        let gone = |what: &str| StoreError::Stopped {
            reason: what.to_string(),
        };
        self.inner
            .jobs
            .send(job)
            .await
            .map_err(|_| gone("job channel closed"))?;
        rx.await
            .map_err(|_| gone("job dropped without an answer"))?
    }

    /// Conditional create: never overwrites. Returns AlreadyExists (not an error) when the key exists.
    pub async fn put_bytes_create(
        &self,
        key: &str,
        bytes: Vec<u8>,
    ) -> Result<PutOutcome, StoreError> {
        let key = key.to_string();
        self.run(move |b| async move {
            let r = b.put_create(&key, bytes.into()).await;
            create_outcome(r)
        })
        .await
    }

    /// Same for a file; large files go multipart (invisible until complete); the file is read on
    /// the tokio thread, never on the caller's executor.
    pub async fn put_file_create(
        &self,
        key: &str,
        path: &FsPath,
    ) -> Result<PutOutcome, StoreError> {
        let (key, path) = (key.to_string(), path.to_path_buf());
        self.run(move |b| async move {
            let r = b.put_file_create(&key, path).await;
            create_outcome(r)
        })
        .await
    }

    pub async fn get_bytes(&self, key: &str) -> Result<Vec<u8>, StoreError> {
        let key = key.to_string();
        self.run(move |b| async move { b.get_bytes(&key).await })
            .await
    }

    /// Parallel ranged GETs (part_bytes each, `parallel` at once) into `dest` (created/truncated,
    /// fsynced at the end); a part that fails or comes back short is re-requested from the byte
    /// where it stopped (resume), up to `retries` times per part, counted in resumed_parts.
    /// On an error `dest` is left incomplete: the caller removes it or fetches again.
    pub async fn get_to_file(
        &self,
        key: &str,
        dest: &FsPath,
        opts: FetchOptions,
    ) -> Result<FetchReport, StoreError> {
        let (key, dest) = (key.to_string(), dest.to_path_buf());
        self.run(move |b| async move { b.get_to_file(&key, dest, opts).await })
            .await
    }

    /// Size of `key`, `None` if absent.
    pub async fn head(&self, key: &str) -> Result<Option<u64>, StoreError> {
        let key = key.to_string();
        self.run(move |b| async move { b.head(&key).await }).await
    }

    /// `(key relative to the URL prefix, size)` of every object whose key starts with `prefix`
    /// (a plain string prefix), sorted by key.
    pub async fn list(&self, prefix: &str) -> Result<Vec<(String, u64)>, StoreError> {
        let prefix = prefix.to_string();
        self.run(move |b| async move { b.list(&prefix).await })
            .await
    }

    /// Deletes `key`; an absent key is Ok.
    pub async fn delete(&self, key: &str) -> Result<(), StoreError> {
        let key = key.to_string();
        self.run(move |b| async move { b.delete(&key).await }).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s3_url_parses_bucket_prefix_and_query() {
        match parse_url("s3://bkt/a/b/?endpoint=http://127.0.0.1:9000&region=eu-1").unwrap() {
            Location::S3 {
                bucket,
                prefix,
                endpoint,
                region,
            } => {
                assert_eq!(bucket, "bkt");
                assert_eq!(prefix, "a/b");
                assert_eq!(endpoint.as_deref(), Some("http://127.0.0.1:9000"));
                assert_eq!(region, "eu-1");
            }
            Location::Local(_) => panic!("not s3"),
        }
    }

    #[test]
    fn bad_urls_are_refused() {
        for url in ["", "s3://", "s3://b?x=1", "file://rel/dir", "http://x/y"] {
            assert!(
                matches!(parse_url(url), Err(StoreError::BadUrl { .. })),
                "{url}"
            );
        }
    }

    #[test]
    fn fetch_options_are_bounded() {
        assert!(FetchOptions::default().check().is_ok());
        let zero = FetchOptions {
            parallel: 0,
            ..Default::default()
        };
        assert!(zero.check().is_err());
        let huge = FetchOptions {
            part_bytes: FETCH_PART_BYTES_MAX + 1,
            ..Default::default()
        };
        assert!(huge.check().is_err());
    }
}
