//! The cluster token and the heads' peer secret: where they are found, how they are made, how
//! a request proves it holds one.
//!
//! - The **cluster token** guards every gRPC call and HTTP request (clients, nodes, workers,
//!   drivers, Ray's own CLI). Every process finds it the same way ([`AuthToken::load`]):
//!   `--auth-token-file F`, then `RAYCTL_AUTH_TOKEN`, then the file named by
//!   `RAYCTL_AUTH_TOKEN_PATH`, then `~/.rayctl/auth_token`. A head that finds none generates a
//!   random 256-bit one at the last of those paths ([`AuthToken::load_or_generate`]).
//! - The **peer secret** guards the Raft transport and membership changes between heads. Only
//!   heads read it (`--peer-secret-file`, `RAYCTL_PEER_SECRET_PATH`, `~/.rayctl/peer_secret`);
//!   it is never put in an environment, a command line or a message, so node daemons, workers
//!   and job code never receive it ([`load_peer_secret`]).
//!
//! Invariant: neither secret is ever formatted: `Debug` shows a length, errors name the
//! origin (a path or a variable name), never the value.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tonic::metadata::MetadataValue;
use tonic::service::Interceptor;
use tonic::{Request, Status};

/// Names the file holding the cluster token (instead of `~/.rayctl/auth_token`).
pub const AUTH_TOKEN_PATH_ENV: &str = "RAYCTL_AUTH_TOKEN_PATH";
/// `token` (the default) or `disabled`, for processes started without `--auth-mode`.
pub const AUTH_MODE_ENV: &str = "RAYCTL_AUTH_MODE";
/// Names the file holding the heads' peer secret (instead of `~/.rayctl/peer_secret`).
pub const PEER_SECRET_PATH_ENV: &str = "RAYCTL_PEER_SECRET_PATH";

/// A cluster token or peer secret. Never printed: `Debug` shows only its length.
#[derive(Clone, PartialEq, Eq)]
pub struct AuthToken(Arc<str>);

impl std::fmt::Debug for AuthToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AuthToken(<{} chars>)", self.0.len())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("cannot read auth token file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot create {path}: {source}")]
    Create {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "auth token from {origin} is empty or has whitespace inside; expected one line of printable characters"
    )]
    Malformed { origin: String },
    #[error("no home directory to keep {what} in: set HOME, or {hint}")]
    NoHome { what: &'static str, hint: String },
}

/// Whether servers demand the cluster token.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum AuthMode {
    #[default]
    Token,
    Disabled,
}

impl std::str::FromStr for AuthMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "token" => Ok(Self::Token),
            "disabled" => Ok(Self::Disabled),
            other => Err(format!(
                "auth mode {other:?}: expected \"token\" or \"disabled\""
            )),
        }
    }
}

impl AuthMode {
    /// `RAYCTL_AUTH_MODE`, else `token`.
    pub fn from_env() -> Result<Self, String> {
        match std::env::var(AUTH_MODE_ENV) {
            Ok(v) if !v.is_empty() => v.parse().map_err(|e| format!("{AUTH_MODE_ENV}: {e}")),
            _ => Ok(Self::Token),
        }
    }
}

fn home_file(name: &str) -> Option<PathBuf> {
    std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(|h| PathBuf::from(h).join(".rayctl").join(name))
}

/// Where a generated cluster token goes: `RAYCTL_AUTH_TOKEN_PATH`, else `~/.rayctl/auth_token`.
pub fn default_token_path() -> Result<PathBuf, TokenError> {
    match std::env::var_os(AUTH_TOKEN_PATH_ENV).filter(|v| !v.is_empty()) {
        Some(p) => Ok(PathBuf::from(p)),
        None => home_file("auth_token").ok_or_else(|| TokenError::NoHome {
            what: "the cluster token",
            hint: format!("pass --auth-token-file or set {AUTH_TOKEN_PATH_ENV}"),
        }),
    }
}

/// Reads a secret file (its mode is the operator's: a Kubernetes secret volume is 0644).
fn read_secret(path: &Path) -> Result<AuthToken, TokenError> {
    let text = std::fs::read_to_string(path).map_err(|source| TokenError::Read {
        path: path.display().to_string(),
        source,
    })?;
    AuthToken::new(&text, &path.display().to_string())
}

/// 32 random bytes from the OS, as 64 hex characters.
fn random_secret() -> Result<String, std::io::Error> {
    let mut b = [0u8; 32];
    getrandom::fill(&mut b).map_err(|e| std::io::Error::other(e.to_string()))?;
    Ok(hex::encode(b))
}

/// Makes `path` hold a new random secret unless it exists; concurrent callers (three heads
/// started at once) all end up reading the one that won. The directory is made 0700, the file
/// 0600, and the file appears complete or not at all (written aside, then hard-linked).
fn create_secret(path: &Path) -> Result<(AuthToken, bool), TokenError> {
    let err = |source| TokenError::Create {
        path: path.display().to_string(),
        source,
    };
    if path.exists() {
        return read_secret(path).map(|t| (t, false));
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(err)?;
    }
    let secret = random_secret().map_err(err)?;
    // Unique per writer (process and thread), so racing writers never share a scratch file.
    let tmp = path.with_extension(format!("tmp.{}.{}", std::process::id(), &secret[..16]));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(err)?;
    f.write_all(format!("{secret}\n").as_bytes())
        .and_then(|_| f.sync_all())
        .map_err(err)?;
    drop(f);
    let linked = std::fs::hard_link(&tmp, path);
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => Ok((AuthToken::new(&secret, "generated")?, true)),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            read_secret(path).map(|t| (t, false))
        }
        Err(e) => Err(err(e)),
    }
}

impl AuthToken {
    pub fn new(token: &str, origin: &str) -> Result<Self, TokenError> {
        let t = token.trim();
        if t.is_empty() || t.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(TokenError::Malformed {
                origin: origin.to_string(),
            });
        }
        Ok(Self(t.into()))
    }

    /// The cluster token as every client finds it: `file` if given, else
    /// `RAYCTL_AUTH_TOKEN`, else the file named by `RAYCTL_AUTH_TOKEN_PATH`, else
    /// `~/.rayctl/auth_token`; none if none of them exists.
    pub fn load(file: Option<&Path>) -> Result<Option<Self>, TokenError> {
        if let Some(path) = file {
            return read_secret(path).map(Some);
        }
        match std::env::var(crate::AUTH_TOKEN_ENV) {
            Ok(v) if !v.is_empty() => return Self::new(&v, crate::AUTH_TOKEN_ENV).map(Some),
            _ => {}
        }
        let path = match default_token_path() {
            Ok(p) => p,
            Err(_) => return Ok(None),
        };
        if std::env::var_os(AUTH_TOKEN_PATH_ENV).is_some_and(|v| !v.is_empty()) || path.exists() {
            // A path named explicitly must exist; the default one may not.
            return read_secret(&path).map(Some);
        }
        Ok(None)
    }

    /// What a head uses: the token found by [`AuthToken::load`], or a new random one written to
    /// `RAYCTL_AUTH_TOKEN_PATH` / `~/.rayctl/auth_token`. The path is returned when this call
    /// created the file, so the caller can say so once.
    pub fn load_or_generate(file: Option<&Path>) -> Result<(Self, Option<PathBuf>), TokenError> {
        if let Some(path) = file {
            return read_secret(path).map(|t| (t, None));
        }
        match std::env::var(crate::AUTH_TOKEN_ENV) {
            Ok(v) if !v.is_empty() => Ok((Self::new(&v, crate::AUTH_TOKEN_ENV)?, None)),
            _ => {
                let path = default_token_path()?;
                let (t, created) = create_secret(&path)?;
                Ok((t, created.then_some(path)))
            }
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Constant time in the token's length so the comparison leaks nothing through timing.
    pub fn matches(&self, given: &str) -> bool {
        let (a, b) = (given.as_bytes(), self.0.as_bytes());
        if a.len() != b.len() {
            return false;
        }
        a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    }

    /// Whether an `authorization` header value (`Bearer <token>`) carries this token.
    pub fn matches_header(&self, header: Option<&str>) -> bool {
        header
            .and_then(|h| h.strip_prefix("Bearer "))
            .is_some_and(|g| self.matches(g))
    }
}

/// The heads' peer secret: `file` if given, else `RAYCTL_PEER_SECRET_PATH`, else
/// `~/.rayctl/peer_secret`; with `create`, a missing one is made (random, 0600). Heads (and
/// the operator's membership commands) only.
pub fn load_peer_secret(file: Option<&Path>, create: bool) -> Result<AuthToken, TokenError> {
    if let Some(path) = file {
        return read_secret(path);
    }
    let path = match std::env::var_os(PEER_SECRET_PATH_ENV).filter(|v| !v.is_empty()) {
        Some(p) => PathBuf::from(p),
        None => home_file("peer_secret").ok_or_else(|| TokenError::NoHome {
            what: "the peer secret",
            hint: format!("pass --peer-secret-file or set {PEER_SECRET_PATH_ENV}"),
        })?,
    };
    if create {
        create_secret(&path).map(|(t, _)| t)
    } else {
        read_secret(&path)
    }
}

/// Client side: adds the token to every request.
#[derive(Clone, Debug, Default)]
pub struct ClientAuth(pub Option<AuthToken>);

impl Interceptor for ClientAuth {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(t) = &self.0 {
            let v: MetadataValue<_> = format!("Bearer {}", t.as_str())
                .parse()
                .map_err(|_| Status::internal("auth token is not a valid header value"))?;
            req.metadata_mut().insert("authorization", v);
        }
        Ok(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn header_matching() {
        let t = AuthToken::new(" s3cret\n", "test").unwrap();
        assert!(t.matches_header(Some("Bearer s3cret")));
        assert!(!t.matches_header(Some("Bearer s3cre")));
        assert!(!t.matches_header(Some("s3cret")));
        assert!(!t.matches_header(None));
        assert!(AuthToken::new("a b", "test").is_err());
        assert!(AuthToken::new("  ", "test").is_err());
        assert!(!format!("{t:?}").contains("s3cret"));
    }

    #[test]
    fn client_interceptor_adds_the_token() {
        let t = AuthToken::new("tok", "test").unwrap();
        let req = ClientAuth(Some(t.clone())).call(Request::new(())).unwrap();
        let h = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        assert!(t.matches_header(h));
        let req = ClientAuth(None).call(Request::new(())).unwrap();
        assert!(req.metadata().get("authorization").is_none());
    }

    #[test]
    fn secrets_are_created_once_and_private() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub").join("secret");
        let (a, created) = create_secret(&path).unwrap();
        assert!(created);
        assert_eq!(a.as_str().len(), 64);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let dmode = std::fs::metadata(path.parent().unwrap())
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(dmode, 0o700);
        let (b, created) = create_secret(&path).unwrap();
        assert!(!created);
        assert_eq!(a, b);
        // Racing creators agree on one secret.
        let p2 = dir.path().join("raced");
        let hs: Vec<_> = (0..8)
            .map(|_| {
                let p = p2.clone();
                std::thread::spawn(move || create_secret(&p).unwrap().0)
            })
            .collect();
        let got: Vec<AuthToken> = hs.into_iter().map(|h| h.join().unwrap()).collect();
        assert!(got.iter().all(|t| *t == got[0]));
    }

    #[test]
    fn auth_modes_parse() {
        assert_eq!("token".parse::<AuthMode>(), Ok(AuthMode::Token));
        assert_eq!("disabled".parse::<AuthMode>(), Ok(AuthMode::Disabled));
        assert!("off".parse::<AuthMode>().unwrap_err().contains("disabled"));
    }
}
