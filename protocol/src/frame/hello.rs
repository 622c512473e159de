//! HELLO: the agent's first frame (SPEC 3.4.1).

use core::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use bytes::BufMut;

use super::settings::Settings;
use super::wire::{
    self, Res, bytes_, fail, fits_str8, is_graphic_ascii, put_str8, str8, u8_, u16_,
};
use super::{Hex, wire_enum};

/// The most versions a HELLO may offer.
pub const MAX_VERSIONS: usize = 16;
/// The most identifiers a HELLO may carry.
pub const MAX_IDENTIFIERS: usize = 64;
/// The longest bearer token, in bytes.
pub const MAX_TOKEN_LEN: usize = 4096;

wire_enum! {
    /// The kind of an agent identifier (SPEC 3.4.1). Unknown kinds are carried and ignored.
    IdentifierKind(u8) {
        /// A host name the agent serves.
        HOST = 0x1,
        /// An IPv4 address the agent serves.
        IPV4 = 0x2,
        /// An IPv6 address the agent serves.
        IPV6 = 0x3,
        /// A network (address and prefix length) the agent serves.
        CIDR = 0x4,
        /// The agent takes destinations no other agent claims.
        DEFAULT_ROUTE = 0x5,
    }
}

/// One thing an agent says it can reach, used by the server to route dials.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Identifier {
    /// A host name: 1 to 255 bytes of printable ASCII.
    Host(String),
    /// An IPv4 address.
    Ipv4(Ipv4Addr),
    /// An IPv6 address.
    Ipv6(Ipv6Addr),
    /// A network: address and prefix length (at most 32 or 128).
    Cidr(IpAddr, u8),
    /// The default route.
    DefaultRoute,
    /// An identifier of a kind this implementation does not know.
    Unknown(IdentifierKind, Vec<u8>),
}

impl Identifier {
    /// Its kind on the wire.
    pub fn kind(&self) -> IdentifierKind {
        match self {
            Identifier::Host(_) => IdentifierKind::HOST,
            Identifier::Ipv4(_) => IdentifierKind::IPV4,
            Identifier::Ipv6(_) => IdentifierKind::IPV6,
            Identifier::Cidr(..) => IdentifierKind::CIDR,
            Identifier::DefaultRoute => IdentifierKind::DEFAULT_ROUTE,
            Identifier::Unknown(k, _) => *k,
        }
    }

    fn value_len(&self) -> usize {
        match self {
            Identifier::Host(h) => h.len(),
            Identifier::Ipv4(_) => 4,
            Identifier::Ipv6(_) => 16,
            Identifier::Cidr(IpAddr::V4(_), _) => 5,
            Identifier::Cidr(IpAddr::V6(_), _) => 17,
            Identifier::DefaultRoute => 0,
            Identifier::Unknown(_, v) => v.len(),
        }
    }

    /// Whether the value is valid for its kind.
    pub fn validate(&self) -> Result<(), &'static str> {
        match self {
            Identifier::Host(h) if h.is_empty() || !fits_str8(h) || !is_graphic_ascii(h) => {
                Err("host identifier is not 1-255 printable ASCII bytes")
            }
            Identifier::Cidr(IpAddr::V4(_), p) if *p > 32 => Err("IPv4 CIDR prefix over 32"),
            Identifier::Cidr(IpAddr::V6(_), p) if *p > 128 => Err("IPv6 CIDR prefix over 128"),
            Identifier::Unknown(k, _) if k.name().is_some() => {
                Err("known identifier kind listed as unknown")
            }
            Identifier::Unknown(_, v) if v.len() > 255 => Err("identifier value over 255 bytes"),
            _ => Ok(()),
        }
    }

    fn encode(&self, dst: &mut impl BufMut) {
        dst.put_u8(self.kind().0);
        dst.put_u8(u8::try_from(self.value_len()).unwrap_or(u8::MAX));
        match self {
            Identifier::Host(h) => dst.put_slice(h.as_bytes()),
            Identifier::Ipv4(a) => dst.put_slice(&a.octets()),
            Identifier::Ipv6(a) => dst.put_slice(&a.octets()),
            Identifier::Cidr(IpAddr::V4(a), p) => {
                dst.put_slice(&a.octets());
                dst.put_u8(*p);
            }
            Identifier::Cidr(IpAddr::V6(a), p) => {
                dst.put_slice(&a.octets());
                dst.put_u8(*p);
            }
            Identifier::DefaultRoute => {}
            Identifier::Unknown(_, v) => dst.put_slice(v),
        }
    }

    fn parse(i: &[u8]) -> Res<'_, Identifier> {
        let (i, kind) = u8_("identifier kind")(i)?;
        let (i, len) = u8_("identifier length")(i)?;
        let (i, v) = bytes_(usize::from(len), "identifier value truncated")(i)?;
        let kind = IdentifierKind(kind);
        let id = match (kind, v.len()) {
            (IdentifierKind::HOST, _) => match core::str::from_utf8(v) {
                Ok(h) => Identifier::Host(h.to_owned()),
                Err(_) => return fail("host identifier is not UTF-8"),
            },
            (IdentifierKind::IPV4, 4) => Identifier::Ipv4(Ipv4Addr::from(octets::<4>(v))),
            (IdentifierKind::IPV6, 16) => Identifier::Ipv6(Ipv6Addr::from(octets::<16>(v))),
            (IdentifierKind::CIDR, 5) => {
                Identifier::Cidr(IpAddr::V4(Ipv4Addr::from(octets::<4>(v))), v[4])
            }
            (IdentifierKind::CIDR, 17) => {
                Identifier::Cidr(IpAddr::V6(Ipv6Addr::from(octets::<16>(v))), v[16])
            }
            (IdentifierKind::DEFAULT_ROUTE, 0) => Identifier::DefaultRoute,
            (
                IdentifierKind::IPV4
                | IdentifierKind::IPV6
                | IdentifierKind::CIDR
                | IdentifierKind::DEFAULT_ROUTE,
                _,
            ) => return fail("identifier value has the wrong length for its kind"),
            (other, _) => Identifier::Unknown(other, v.to_vec()),
        };
        match id.validate() {
            Ok(()) => Ok((i, id)),
            Err(reason) => fail(reason),
        }
    }
}

fn octets<const N: usize>(v: &[u8]) -> [u8; N] {
    let mut out = [0u8; N];
    out.copy_from_slice(&v[..N]);
    out
}

impl fmt::Display for Identifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Identifier::Host(h) => write!(f, "host={h}"),
            Identifier::Ipv4(a) => write!(f, "ipv4={a}"),
            Identifier::Ipv6(a) => write!(f, "ipv6={a}"),
            Identifier::Cidr(a, p) => write!(f, "cidr={a}/{p}"),
            Identifier::DefaultRoute => write!(f, "default-route=true"),
            Identifier::Unknown(k, v) => write!(f, "{:#04x}={}", k.0, Hex(v)),
        }
    }
}

/// A bearer token: 1 to 4096 bytes of printable ASCII. Its `Debug` never shows the secret.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Token(String);

impl Token {
    /// Wraps `token` after checking it.
    pub fn new(token: impl Into<String>) -> Result<Token, &'static str> {
        let token = token.into();
        if token.is_empty() || token.len() > MAX_TOKEN_LEN || !is_graphic_ascii(&token) {
            return Err("token is not 1-4096 printable ASCII bytes");
        }
        Ok(Token(token))
    }

    /// The secret itself.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

//= SPEC §3.4.1
//# Implementations MUST NOT log the token.
impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Token(<{} bytes>)", self.0.len())
    }
}

/// HELLO: what the agent offers and who it is (SPEC 3.4.1).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Hello {
    /// Versions the agent speaks, strictly ascending, 1 to 16 of them.
    pub versions: Vec<u16>,
    /// The agent's id: 1 to 255 bytes of UTF-8.
    pub agent_id: String,
    /// What the agent can reach, at most 64.
    pub identifiers: Vec<Identifier>,
    /// The agent's settings.
    pub settings: Settings,
    /// An optional bearer token.
    pub token: Option<Token>,
}

impl Hello {
    /// Whether every field is valid (the decoder checks the same).
    pub fn validate(&self) -> Result<(), &'static str> {
        if self.versions.is_empty() || self.versions.len() > MAX_VERSIONS {
            return Err("HELLO must offer 1 to 16 versions");
        }
        if self.versions.windows(2).any(|w| w[0] >= w[1]) {
            return Err("HELLO versions are not strictly ascending");
        }
        if self.agent_id.is_empty() || !fits_str8(&self.agent_id) {
            return Err("agent id is not 1-255 bytes");
        }
        if self.identifiers.len() > MAX_IDENTIFIERS {
            return Err("too many identifiers");
        }
        for id in &self.identifiers {
            id.validate()?;
        }
        self.settings.validate()
    }

    pub(crate) fn encoded_len(&self) -> usize {
        1 + 2 * self.versions.len()
            + 1
            + self.agent_id.len()
            + 1
            + self
                .identifiers
                .iter()
                .map(|i| 2 + i.value_len())
                .sum::<usize>()
            + self.settings.encoded_len()
            + 2
            + self.token.as_ref().map_or(0, |t| t.0.len())
    }

    pub(crate) fn encode(&self, dst: &mut impl BufMut) {
        dst.put_u8(u8::try_from(self.versions.len()).unwrap_or(u8::MAX));
        for v in &self.versions {
            dst.put_u16(*v);
        }
        put_str8(dst, &self.agent_id);
        dst.put_u8(u8::try_from(self.identifiers.len()).unwrap_or(u8::MAX));
        for id in &self.identifiers {
            id.encode(dst);
        }
        self.settings.encode(dst);
        match &self.token {
            Some(t) => {
                dst.put_u16(u16::try_from(t.0.len()).unwrap_or(u16::MAX));
                dst.put_slice(t.0.as_bytes());
            }
            None => dst.put_u16(0),
        }
    }

    pub(crate) fn decode(payload: &[u8]) -> Result<Hello, &'static str> {
        let hello = wire::run(payload, |i| {
            let (mut i, n) = u8_("version count")(i)?;
            let mut versions = Vec::with_capacity(usize::from(n).min(MAX_VERSIONS));
            for _ in 0..n {
                let (rest, v) = u16_("version")(i)?;
                versions.push(v);
                i = rest;
            }
            let (i, agent_id) = str8("agent id runs past the payload", "agent id is not UTF-8")(i)?;
            let (mut i, n) = u8_("identifier count")(i)?;
            if usize::from(n) > MAX_IDENTIFIERS {
                return fail("too many identifiers");
            }
            let mut identifiers = Vec::with_capacity(usize::from(n));
            for _ in 0..n {
                let (rest, id) = Identifier::parse(i)?;
                identifiers.push(id);
                i = rest;
            }
            let (i, settings) = Settings::parse(i)?;
            let (i, token_len) = u16_("token length")(i)?;
            let (i, raw) = bytes_(usize::from(token_len), "token truncated")(i)?;
            let token = match token_len {
                0 => None,
                _ => match core::str::from_utf8(raw)
                    .map_err(|_| ())
                    .and_then(|t| Token::new(t).map_err(|_| ()))
                {
                    Ok(t) => Some(t),
                    Err(()) => return fail("token is not 1-4096 printable ASCII bytes"),
                },
            };
            Ok((
                i,
                Hello {
                    versions,
                    agent_id: agent_id.to_owned(),
                    identifiers,
                    settings,
                    token,
                },
            ))
        })?;
        hello.validate()?;
        Ok(hello)
    }

    pub(crate) fn describe(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "HELLO versions={:?} agent_id={:?} identifiers=[",
            self.versions, self.agent_id
        )?;
        for (n, id) in self.identifiers.iter().enumerate() {
            if n > 0 {
                f.write_str(",")?;
            }
            write!(f, "{id}")?;
        }
        write!(f, "] settings={} token=", self.settings)?;
        match &self.token {
            Some(t) => write!(f, "<{} bytes>", t.0.len()),
            None => f.write_str("none"),
        }
    }
}
