//! Who asked: the origin of the command that appended an event (ADR 0014), carried on the
//! envelope (version 2) of every event a command appends.
//!
//! Every text field comes from outside (an HTTP header, a peer address, a NATS reply subject):
//! untrusted. The constructors bound each field ([`crate::text::bound`], ending in `…` when
//! cut); decoding refuses a field longer than its bound or an empty principal, so a forged
//! envelope cannot carry more than an honest one. The text stays data: printers escape it
//! ([`crate::text::escape`]).

use serde::{Deserialize, Serialize};

use crate::text::bound;

/// The most bytes of an origin's principal (an nkey public key is 56).
pub const PRINCIPAL_MAX: usize = 64;
/// The most bytes of an HTTP client's address (`[v6 address]:port` fits).
pub const ADDRESS_MAX: usize = 64;
/// The most bytes of an HTTP client's `User-Agent`.
pub const CLIENT_MAX: usize = 128;
/// The most bytes of a request id (`req-` and a UUID is 40).
pub const REQUEST_ID_MAX: usize = 64;

/// How a command reached the command handler.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Via {
    /// The HTTP API (in-process with its handler).
    Http,
    /// A NATS request on `usbpt.cmd.{kind}` (the CLI, scripts).
    Nats,
    /// The control plane itself: the reactor's releases, the resize auto-confirm.
    Policy,
}

impl Via {
    pub fn as_str(self) -> &'static str {
        match self {
            Via::Http => "http",
            Via::Nats => "nats",
            Via::Policy => "policy",
        }
    }
}

/// Who asked for a command: how it arrived, the identity it arrived as, and what the HTTP
/// client said about itself. See ADR 0014 for which parts are verified.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "OriginFields")]
pub struct Origin {
    via: Via,
    /// HTTP: the credential's identity (`token`, or `anonymous` when the API has none); NATS:
    /// the requester's nkey public key (or `unauthenticated` on a bus without nkeys); policy:
    /// the component (`reactor`, `auto-confirm`).
    principal: String,
    /// HTTP: the peer's socket address (the proxy's, behind a proxy).
    address: Option<String>,
    /// HTTP: the `User-Agent`.
    client: Option<String>,
    /// HTTP: the request id (`x-openstack-request-id` the client sent, or the one the API
    /// answered with).
    request_id: Option<String>,
}

/// What decoding reads, checked into an [`Origin`].
#[derive(Deserialize)]
struct OriginFields {
    via: Via,
    principal: String,
    address: Option<String>,
    client: Option<String>,
    request_id: Option<String>,
}

impl TryFrom<OriginFields> for Origin {
    type Error = String;

    fn try_from(f: OriginFields) -> Result<Self, String> {
        let long = |name: &str, v: &Option<String>, max: usize| match v {
            Some(s) if s.len() > max => Err(format!("origin.{name}: longer than {max} bytes")),
            _ => Ok(()),
        };
        if f.principal.is_empty() {
            return Err("origin.principal: empty".into());
        }
        long("principal", &Some(f.principal.clone()), PRINCIPAL_MAX)?;
        long("address", &f.address, ADDRESS_MAX)?;
        long("client", &f.client, CLIENT_MAX)?;
        long("request_id", &f.request_id, REQUEST_ID_MAX)?;
        Ok(Self {
            via: f.via,
            principal: f.principal,
            address: f.address,
            client: f.client,
            request_id: f.request_id,
        })
    }
}

fn bounded(s: impl Into<String>, max: usize) -> String {
    bound(s.into(), max).0
}

impl Origin {
    /// An origin with its principal (cut to [`PRINCIPAL_MAX`]; an empty one is `unknown`).
    pub fn new(via: Via, principal: impl Into<String>) -> Self {
        let mut principal = bounded(principal, PRINCIPAL_MAX);
        if principal.is_empty() {
            principal = "unknown".into();
        }
        Self {
            via,
            principal,
            address: None,
            client: None,
            request_id: None,
        }
    }

    /// A control-plane component's own decision (`reactor`, `auto-confirm`).
    pub fn policy(component: &str) -> Self {
        Self::new(Via::Policy, component)
    }

    pub fn with_address(mut self, address: impl Into<String>) -> Self {
        self.address = Some(bounded(address, ADDRESS_MAX));
        self
    }

    pub fn with_client(mut self, client: impl Into<String>) -> Self {
        self.client = Some(bounded(client, CLIENT_MAX));
        self
    }

    pub fn with_request_id(mut self, id: impl Into<String>) -> Self {
        self.request_id = Some(bounded(id, REQUEST_ID_MAX));
        self
    }

    pub fn via(&self) -> Via {
        self.via
    }
    pub fn principal(&self) -> &str {
        &self.principal
    }
    pub fn address(&self) -> Option<&str> {
        self.address.as_deref()
    }
    pub fn client(&self) -> Option<&str> {
        self.client.as_deref()
    }
    pub fn request_id(&self) -> Option<&str> {
        self.request_id.as_deref()
    }

    /// One line for a table or CSV cell: `via:principal`, then `@address` if any (unescaped:
    /// escape it for a terminal).
    pub fn summary(&self) -> String {
        let mut s = format!("{}:{}", self.via.as_str(), self.principal);
        if let Some(a) = &self.address {
            s.push('@');
            s.push_str(a);
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_are_bounded_and_decoding_refuses_longer_ones() {
        let o = Origin::new(Via::Http, "token")
            .with_client("x".repeat(1000))
            .with_address("127.0.0.1:5000");
        assert_eq!(o.client().map(str::len), Some(CLIENT_MAX));
        assert!(o.client().is_some_and(|c| c.ends_with('…')));
        let json = serde_json::to_string(&o).expect("json");
        assert_eq!(serde_json::from_str::<Origin>(&json).ok(), Some(o));
        let long = format!(
            r#"{{"via":"nats","principal":"{}","address":null,"client":null,"request_id":null}}"#,
            "U".repeat(PRINCIPAL_MAX + 1)
        );
        let err = serde_json::from_str::<Origin>(&long).expect_err("too long");
        assert!(err.to_string().contains("origin.principal"), "{err}");
        let empty =
            r#"{"via":"nats","principal":"","address":null,"client":null,"request_id":null}"#;
        assert!(serde_json::from_str::<Origin>(empty).is_err());
        assert_eq!(Origin::new(Via::Nats, "").principal(), "unknown");
    }
}
