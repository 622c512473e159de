//! What both frontends share of HTTP: a failed request's answer (a status and a one-line
//! reason, docs/CONNECT.md) and the authority-form target parser.

use tokio::io::{AsyncWrite, AsyncWriteExt};

/// An HTTP error answer: status and reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpError {
    /// Status code.
    pub status: u16,
    /// One line for the client and the log.
    pub reason: String,
}

pub(crate) fn err(status: u16, reason: impl Into<String>) -> HttpError {
    HttpError {
        status,
        reason: reason.into(),
    }
}

fn status_text(status: u16) -> &'static str {
    match status {
        400 => "Bad Request",
        403 => "Forbidden",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        431 => "Request Header Fields Too Large",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Error",
    }
}

/// Splits an authority-form request target (RFC 9110 9.3.6): `host:port` or `[v6]:port`.
/// Strict: the host is a DNS-style name (letters, digits, `-`, `.`, `_`), an IPv4 address or
/// a bracketed IPv6 address; the port is 1 to 65535 in plain decimal (no sign, no leading
/// zero).
pub fn parse_authority(target: &str) -> Result<(String, u16), HttpError> {
    let (host, port) = if let Some(rest) = target.strip_prefix('[') {
        let (h, after) = rest
            .split_once(']')
            .ok_or_else(|| err(400, "request target has an unclosed '['"))?;
        let port = after
            .strip_prefix(':')
            .ok_or_else(|| err(400, "request target has no port"))?;
        if h.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(err(
                400,
                "request target has a bracketed host that is not IPv6",
            ));
        }
        (h, port)
    } else {
        let (h, port) = target
            .rsplit_once(':')
            .ok_or_else(|| err(400, "request target has no port"))?;
        let name_char = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_');
        if !h.bytes().all(name_char) {
            return Err(err(400, "request target host is not a name or an address"));
        }
        (h, port)
    };
    if host.is_empty() || host.len() > 255 {
        return Err(err(400, "request target host is empty or over 255 bytes"));
    }
    let decimal = !port.is_empty()
        && port.len() <= 5
        && port.bytes().all(|b| b.is_ascii_digit())
        && !port.starts_with('0');
    let port: u16 = port
        .parse()
        .ok()
        .filter(|_| decimal)
        .ok_or_else(|| err(400, "request target port is not 1-65535 in plain decimal"))?;
    Ok((host.to_owned(), port))
}

/// Writes `e` as a complete HTTP/1.1 response and closes.
pub(crate) async fn answer<S: AsyncWrite + Unpin>(conn: &mut S, e: &HttpError) {
    let body = format!("{}\n", e.reason);
    let head = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n{}\r\n",
        e.status,
        status_text(e.status),
        body.len(),
        if e.status == 405 {
            "Allow: CONNECT\r\n"
        } else {
            ""
        },
    );
    let _ = conn.write_all(head.as_bytes()).await;
    let _ = conn.write_all(body.as_bytes()).await;
    let _ = conn.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authorities_parse_with_ipv6_brackets_and_refuse_a_missing_port() {
        assert_eq!(
            parse_authority("10.0.0.1:10250").unwrap(),
            ("10.0.0.1".into(), 10250)
        );
        assert_eq!(parse_authority("[::1]:443").unwrap(), ("::1".into(), 443));
        assert_eq!(parse_authority("node-1:22").unwrap(), ("node-1".into(), 22));
        assert_eq!(parse_authority("node-1").unwrap_err().status, 400);
        assert_eq!(parse_authority("node-1:0").unwrap_err().status, 400);
        assert_eq!(parse_authority(":80").unwrap_err().status, 400);
        assert_eq!(parse_authority("[::1]").unwrap_err().status, 400);
    }

    #[test]
    fn ports_and_hosts_outside_plain_syntax_are_a_400() {
        for bad in [
            "node:+19010",
            "node:019010",
            "node:19010 ",
            "node:65536",
            "node:",
            "a/b:80",
            "user@node:80",
            "[not-v6]:80",
            "[::1]:+1",
        ] {
            assert_eq!(parse_authority(bad).unwrap_err().status, 400, "{bad}");
        }
        assert_eq!(parse_authority("node_1.x:65535").unwrap().1, 65535);
    }
}
