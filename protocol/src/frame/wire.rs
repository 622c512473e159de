//! Shared field parsers and writers for frame payloads (SPEC 3.3).
//!
//! Payload parsers run over a complete payload slice (the header already told its length), so
//! they use nom's `complete` parsers: running out of bytes inside a payload is a malformed frame,
//! never a request for more input.

use bytes::BufMut;
use nom::IResult;
use nom::error::{ErrorKind, ParseError};

/// A static reason why a payload did not parse.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Reason(pub(crate) &'static str);

impl<I> ParseError<I> for Reason {
    fn from_error_kind(_: I, _: ErrorKind) -> Self {
        Reason("payload truncated")
    }

    fn append(_: I, _: ErrorKind, other: Self) -> Self {
        other
    }
}

pub(crate) type Res<'a, T> = IResult<&'a [u8], T, Reason>;

/// Replaces whatever error `result` carries with `reason`.
pub(crate) fn why<'a, T>(reason: &'static str, result: Res<'a, T>) -> Res<'a, T> {
    result.map_err(|e| e.map(|_| Reason(reason)))
}

/// A parse failure with `reason`.
pub(crate) fn fail<T>(reason: &'static str) -> Result<T, nom::Err<Reason>> {
    Err(nom::Err::Failure(Reason(reason)))
}

pub(crate) fn u8_(what: &'static str) -> impl Fn(&[u8]) -> Res<'_, u8> {
    move |i| why(what, nom::number::complete::be_u8(i))
}

pub(crate) fn u16_(what: &'static str) -> impl Fn(&[u8]) -> Res<'_, u16> {
    move |i| why(what, nom::number::complete::be_u16(i))
}

pub(crate) fn u32_(what: &'static str) -> impl Fn(&[u8]) -> Res<'_, u32> {
    move |i| why(what, nom::number::complete::be_u32(i))
}

pub(crate) fn u64_(what: &'static str) -> impl Fn(&[u8]) -> Res<'_, u64> {
    move |i| why(what, nom::number::complete::be_u64(i))
}

pub(crate) fn bytes_(n: usize, what: &'static str) -> impl Fn(&[u8]) -> Res<'_, &[u8]> {
    move |i| why(what, nom::bytes::complete::take(n)(i))
}

/// A `u8` length then that many bytes of UTF-8 (a `str8` field). `past` names a field that
/// runs past the payload, `invalid` one whose bytes are not valid.
pub(crate) fn str8(past: &'static str, invalid: &'static str) -> impl Fn(&[u8]) -> Res<'_, &str> {
    move |i| {
        let (i, len) = u8_(past)(i)?;
        let (i, raw) = bytes_(usize::from(len), past)(i)?;
        match core::str::from_utf8(raw) {
            Ok(s) => Ok((i, s)),
            Err(_) => fail(invalid),
        }
    }
}

/// Writes a `str8` field. The caller has validated the length (at most 255).
pub(crate) fn put_str8(dst: &mut impl BufMut, s: &str) {
    dst.put_u8(u8::try_from(s.len()).unwrap_or(u8::MAX));
    dst.put_slice(&s.as_bytes()[..s.len().min(255)]);
}

/// Ends a payload parse: trailing bytes are an error (SPEC 3.3).
pub(crate) fn finish<T>(rest: &[u8], value: T) -> Result<T, &'static str> {
    if rest.is_empty() {
        Ok(value)
    } else {
        Err("trailing bytes after the payload")
    }
}

//= SPEC §3.3
//# A receiver MUST validate every field when it decodes a frame: lengths, UTF-8, ranges, order.
//= SPEC §3.3
//# A payload MUST be consumed exactly: bytes left after the last field, or a field that runs
//# past the end of the payload, make the frame malformed.
/// Runs `parse` over a whole payload and turns nom's error into a static reason.
pub(crate) fn run<'a, T>(
    payload: &'a [u8],
    parse: impl FnOnce(&'a [u8]) -> Res<'a, T>,
) -> Result<T, &'static str> {
    match parse(payload) {
        Ok((rest, value)) => finish(rest, value),
        Err(nom::Err::Error(r) | nom::Err::Failure(r)) => Err(r.0),
        Err(nom::Err::Incomplete(_)) => Err("payload truncated"),
    }
}

/// Whether `s` is a valid short text field: at most 255 bytes (SPEC 3.3, `str8`).
pub(crate) fn fits_str8(s: &str) -> bool {
    s.len() <= 255
}

/// Whether `s` is printable ASCII without spaces (hosts, tokens).
pub(crate) fn is_graphic_ascii(s: &str) -> bool {
    s.bytes().all(|b| b.is_ascii_graphic())
}
