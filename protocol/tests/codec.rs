//! Codec properties: round trips, splitting, limits, and no panic on any input.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;
use tether_proto::frame::*;
use tether_proto::{DecodeError, FrameCodec};

fn text(max: usize) -> impl Strategy<Value = String> {
    proptest::string::string_regex(&format!("[a-z0-9.:é-]{{0,{max}}}"))
        .unwrap()
        .prop_filter("fits str8", |s| s.len() <= 255)
}

fn host() -> impl Strategy<Value = String> {
    proptest::string::string_regex("[a-z0-9.:-]{1,60}").unwrap()
}

fn settings() -> impl Strategy<Value = Settings> {
    (
        proptest::option::of(1u32..=MAX_WINDOW),
        proptest::option::of(MIN_MAX_FRAME_SIZE..=MAX_PAYLOAD_LIMIT),
        proptest::option::of(any::<u32>()),
        proptest::option::of(any::<u32>()),
        proptest::option::of(0u32..=1),
        proptest::collection::btree_map(6u16.., any::<u32>(), 0..4),
    )
        .prop_map(|(w, f, c, k, d, unknown)| Settings {
            initial_window: w,
            max_frame_size: f,
            max_concurrent_streams: c,
            keepalive_interval: k,
            drain_notice: d,
            unknown: unknown
                .into_iter()
                .map(|(id, v)| (SettingId(id), v))
                .collect(),
        })
}

fn identifier() -> impl Strategy<Value = Identifier> {
    prop_oneof![
        host().prop_map(Identifier::Host),
        any::<[u8; 4]>().prop_map(|o| Identifier::Ipv4(Ipv4Addr::from(o))),
        any::<[u8; 16]>().prop_map(|o| Identifier::Ipv6(Ipv6Addr::from(o))),
        (any::<[u8; 4]>(), 0u8..=32).prop_map(|(o, p)| Identifier::Cidr(IpAddr::from(o), p)),
        (any::<[u8; 16]>(), 0u8..=128).prop_map(|(o, p)| Identifier::Cidr(IpAddr::from(o), p)),
        Just(Identifier::DefaultRoute),
        (6u8.., proptest::collection::vec(any::<u8>(), 0..8))
            .prop_map(|(k, v)| Identifier::Unknown(IdentifierKind(k), v)),
    ]
}

fn stream() -> impl Strategy<Value = StreamId> {
    (1u32..=MAX_STREAM_ID).prop_map(StreamId)
}

fn frame() -> impl Strategy<Value = Frame> {
    prop_oneof![
        (
            proptest::collection::btree_set(any::<u16>(), 1..4),
            host(),
            proptest::collection::vec(identifier(), 0..5),
            settings(),
            proptest::option::of(proptest::string::string_regex("[!-~]{1,40}").unwrap()),
        )
            .prop_map(|(v, a, ids, s, t)| Frame::Hello(Hello {
                versions: v.into_iter().collect(),
                agent_id: a,
                identifiers: ids,
                settings: s,
                token: t.map(|t| Token::new(t).unwrap()),
            })),
        (any::<u16>(), host(), 1u16.., settings()).prop_map(|(v, id, n, s)| {
            Frame::Welcome(Welcome {
                version: v,
                server_id: id,
                server_count: n,
                settings: s,
            })
        }),
        (stream(), any::<u8>(), host(), 1u16..).prop_map(|(s, p, h, port)| Frame::Dial(Dial {
            stream: s,
            protocol: Protocol(p),
            host: h,
            port,
        })),
        stream().prop_map(|s| Frame::DialOk(DialOk { stream: s })),
        (
            stream(),
            any::<bool>(),
            proptest::collection::vec(any::<u8>(), 0..300)
        )
            .prop_map(|(s, fin, p)| Frame::Data(Data {
                stream: s,
                fin,
                payload: p.into(),
            })),
        (stream(), 1u32..=MAX_WINDOW).prop_map(|(s, i)| Frame::Window(WindowUpdate {
            stream: s,
            increment: i,
        })),
        (stream(), any::<u32>(), text(40)).prop_map(|(s, c, r)| Frame::Reset(Reset {
            stream: s,
            code: ErrorCode(c),
            reason: r,
        })),
        (any::<bool>(), any::<u64>()).prop_map(|(ack, payload)| Frame::Ping(Ping { ack, payload })),
        (0u32..=MAX_STREAM_ID, any::<u32>(), text(40)).prop_map(|(l, c, r)| Frame::GoAway(
            GoAway {
                last_stream: StreamId(l),
                code: ErrorCode(c),
                reason: r,
            }
        )),
        Just(Frame::Draining),
        (
            11u8..,
            any::<u8>(),
            0u32..=MAX_STREAM_ID,
            proptest::collection::vec(any::<u8>(), 0..40)
        )
            .prop_map(|(k, f, s, p)| Frame::Unknown(Unknown {
                kind: FrameKind(k),
                flags: f,
                stream: StreamId(s),
                payload: p.into(),
            })),
    ]
}

fn encode_all(frames: &[Frame]) -> BytesMut {
    let mut codec = FrameCodec::default();
    let mut buf = BytesMut::new();
    for f in frames {
        codec.encode(f, &mut buf);
    }
    buf
}

fn decode_chunked(bytes: &[u8], cuts: &[usize]) -> Vec<Frame> {
    let mut codec = FrameCodec::with_max_payload(MAX_PAYLOAD_LIMIT);
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    let mut at = 0;
    for &cut in cuts.iter().chain(core::iter::once(&bytes.len())) {
        let cut = cut.clamp(at, bytes.len());
        buf.extend_from_slice(&bytes[at..cut]);
        at = cut;
        while let Some(f) = codec.decode(&mut buf).expect("valid bytes decode") {
            out.push(f);
        }
    }
    assert!(buf.is_empty());
    out
}

proptest! {
    #[test]
    fn any_valid_frame_round_trips_byte_for_byte(f in frame()) {
        let bytes = encode_all(core::slice::from_ref(&f));
        prop_assert_eq!(bytes.len(), f.encoded_len());
        let mut codec = FrameCodec::with_max_payload(MAX_PAYLOAD_LIMIT);
        let mut buf = bytes.clone();
        let back = codec.decode(&mut buf).unwrap().unwrap();
        prop_assert!(buf.is_empty());
        prop_assert_eq!(&back, &f);
        prop_assert_eq!(encode_all(&[back]), bytes);
    }

    #[test]
    fn a_stream_cut_anywhere_decodes_to_the_same_frames(
        frames in proptest::collection::vec(frame(), 1..6),
        cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..8),
    ) {
        let bytes = encode_all(&frames);
        let mut cuts: Vec<usize> = cuts.iter().map(|i| i.index(bytes.len() + 1)).collect();
        cuts.sort_unstable();
        prop_assert_eq!(decode_chunked(&bytes, &cuts), frames);
    }

    #[test]
    fn random_bytes_never_panic_and_what_decodes_reencodes_identically(
        bytes in proptest::collection::vec(any::<u8>(), 0..200),
    ) {
        let mut codec = FrameCodec::with_max_payload(1024);
        let mut buf = BytesMut::from(&bytes[..]);
        let mut consumed = 0;
        loop {
            let before = buf.len();
            match codec.decode(&mut buf) {
                Ok(Some(f)) => {
                    let used = before - buf.len();
                    prop_assert_eq!(&encode_all(core::slice::from_ref(&f))[..], &bytes[consumed..consumed + used]);
                    consumed += used;
                }
                Ok(None) | Err(_) => break,
            }
        }
    }
}

#[test]
fn a_stream_split_at_every_byte_position_decodes_to_the_same_frames() {
    let frames = vec![
        Frame::Ping(Ping {
            ack: false,
            payload: 7,
        }),
        Frame::Data(Data {
            stream: StreamId(1),
            fin: false,
            payload: Bytes::from_static(b"hello, tunnel"),
        }),
        Frame::Reset(Reset {
            stream: StreamId(3),
            code: ErrorCode::CANCEL,
            reason: "bye".into(),
        }),
        Frame::Data(Data {
            stream: StreamId(1),
            fin: true,
            payload: Bytes::new(),
        }),
    ];
    let bytes = encode_all(&frames);
    for cut in 0..=bytes.len() {
        assert_eq!(decode_chunked(&bytes, &[cut]), frames, "cut at {cut}");
    }
    // And one byte at a time.
    let every: Vec<usize> = (0..bytes.len()).collect();
    assert_eq!(decode_chunked(&bytes, &every), frames);
}

#[test]
fn a_header_announcing_a_payload_over_the_limit_is_refused_before_allocating() {
    let mut codec = FrameCodec::with_max_payload(65_536);
    let header = Header {
        kind: FrameKind::DATA,
        flags: 0,
        stream: StreamId(1),
        len: u32::MAX,
    };
    let mut buf = BytesMut::with_capacity(16);
    buf.extend_from_slice(&header.to_bytes());
    let cap = buf.capacity();
    let err = codec.decode(&mut buf).unwrap_err();
    assert_eq!(
        err,
        DecodeError::TooLarge {
            kind: FrameKind::DATA,
            len: u32::MAX,
            max: 65_536
        }
    );
    assert_eq!(err.code(), ErrorCode::FRAME_TOO_LARGE);
    assert_eq!(
        buf.capacity(),
        cap,
        "no memory was reserved for the payload"
    );
}

#[test]
fn an_incomplete_frame_within_the_limit_reserves_at_most_its_own_length() {
    let mut codec = FrameCodec::with_max_payload(65_536);
    let header = Header {
        kind: FrameKind::DATA,
        flags: 0,
        stream: StreamId(1),
        len: 1000,
    };
    let mut buf = BytesMut::new();
    buf.extend_from_slice(&header.to_bytes());
    assert_eq!(codec.decode(&mut buf), Ok(None));
    assert_eq!(buf.len(), HEADER_LEN, "nothing consumed");
    assert!(buf.capacity() >= HEADER_LEN + 1000);
    assert!(buf.capacity() < HEADER_LEN + 65_536);
}

#[test]
fn a_decoded_data_payload_is_a_slice_of_the_read_buffer() {
    let mut codec = FrameCodec::default();
    let mut buf = BytesMut::new();
    codec.encode(
        &Frame::Data(Data {
            stream: StreamId(1),
            fin: false,
            payload: Bytes::from(vec![9u8; 4096]),
        }),
        &mut buf,
    );
    let region = buf.as_ptr() as usize..buf.as_ptr() as usize + buf.len();
    let Some(Frame::Data(d)) = codec.decode(&mut buf).unwrap() else {
        panic!("a DATA frame");
    };
    let p = d.payload.as_ptr() as usize;
    assert!(region.contains(&p), "payload points into the read buffer");
    assert_eq!(p, region.start + HEADER_LEN);
}

#[test]
fn a_data_payload_is_handed_to_a_vectored_writer_without_a_copy() {
    let payload = Bytes::from(vec![1u8; 70_000]);
    let f = Frame::Data(Data {
        stream: StreamId(2),
        fin: true,
        payload: payload.clone(),
    });
    let header = f.header().to_bytes();
    assert_eq!(Header::parse(&header).len, 70_000);
    assert_eq!(f.payload_bytes().unwrap().as_ptr(), payload.as_ptr());
}

#[test]
fn unknown_wire_values_print_as_hex_and_known_ones_by_name() {
    assert_eq!(format!("{:?}", FrameKind(0x42)), "FrameKind(0x42)");
    assert_eq!(
        format!("{}", ErrorCode::FLOW_CONTROL_ERROR),
        "FLOW_CONTROL_ERROR"
    );
    assert_eq!(format!("{}", ErrorCode(0xbeef)), "ErrorCode(0xbeef)");
    assert_eq!(format!("{:?}", SettingId(0x77)), "SettingId(0x77)");
}

#[test]
fn a_token_never_shows_in_debug_output() {
    let t = Token::new("hunter2").unwrap();
    assert!(!format!("{t:?}").contains("hunter2"));
    let hello = Hello {
        versions: vec![1],
        agent_id: "a".into(),
        identifiers: vec![],
        settings: Settings::default(),
        token: Some(t),
    };
    assert!(!format!("{hello:?}").contains("hunter2"));
    assert!(!Frame::Hello(hello).to_string().contains("hunter2"));
}

#[cfg(feature = "tokio-codec")]
#[test]
fn the_tokio_decoder_reports_malformed_frames_as_decode_errors() {
    use tokio_util::codec::Decoder;
    let mut codec = FrameCodec::default();
    let mut buf = BytesMut::from(&[5u8, 0, 0, 0, 0, 0, 0, 0, 0, 0][..]);
    match Decoder::decode(&mut codec, &mut buf) {
        Err(tether_proto::codec::CodecError::Decode(e)) => {
            assert_eq!(e.code(), ErrorCode::MALFORMED_FRAME)
        }
        other => panic!("expected a decode error, got {other:?}"),
    }
}

// ----- boundaries the mutation run found untested (docs/MODEL.md, "Mutation score") -----

fn hello_with(identifiers: Vec<Identifier>) -> Hello {
    Hello {
        versions: vec![1],
        agent_id: "agent".into(),
        identifiers,
        settings: Settings::default(),
        token: None,
    }
}

#[test]
fn a_hello_with_exactly_64_identifiers_decodes_and_65_are_refused() {
    let ids = |n: usize| {
        (0..n)
            .map(|k| Identifier::Host(format!("node-{k}")))
            .collect::<Vec<_>>()
    };
    let sixty_four = Frame::Hello(hello_with(ids(64)));
    let mut buf = encode_all(std::slice::from_ref(&sixty_four));
    let mut codec = FrameCodec::with_max_payload(HANDSHAKE_MAX_PAYLOAD);
    assert_eq!(codec.decode(&mut buf).unwrap(), Some(sixty_four));
    // 65 written by hand: the encoder would not take them.
    let mut over = encode_all(&[Frame::Hello(hello_with(ids(64)))]);
    let count_at = HEADER_LEN + 1 + 2 + 1 + "agent".len();
    assert_eq!(over[count_at], 64);
    over[count_at] = 65;
    let mut codec = FrameCodec::with_max_payload(HANDSHAKE_MAX_PAYLOAD);
    assert!(
        codec.decode(&mut over).is_err(),
        "65 identifiers are malformed"
    );
}

#[test]
fn an_unknown_identifier_value_over_255_bytes_is_refused_before_encoding() {
    let long = Identifier::Unknown(IdentifierKind(0x20), vec![7; 256]);
    assert!(hello_with(vec![long]).validate().is_err());
    let fits = Identifier::Unknown(IdentifierKind(0x20), vec![7; 255]);
    assert_eq!(hello_with(vec![fits]).validate(), Ok(()));
}

#[test]
fn a_welcome_needs_a_server_id_of_1_to_255_bytes() {
    let welcome = |server_id: String| Welcome {
        version: 1,
        server_id,
        server_count: 1,
        settings: Settings::default(),
    };
    assert!(welcome(String::new()).validate().is_err(), "empty");
    assert!(welcome("s".repeat(256)).validate().is_err(), "256 bytes");
    assert_eq!(welcome("s".repeat(255)).validate(), Ok(()));
}

#[test]
fn a_host_identifier_needs_1_to_255_printable_bytes() {
    let host = |h: String| hello_with(vec![Identifier::Host(h)]).validate();
    assert!(host(String::new()).is_err(), "empty");
    assert!(host("h".repeat(256)).is_err(), "256 bytes");
    assert!(host("a b".into()).is_err(), "a space");
    assert_eq!(host("h".repeat(255)), Ok(()));
}

#[test]
fn a_token_exposes_exactly_the_secret_it_was_given() {
    let token = Token::new("s3cr3t-token").unwrap();
    assert_eq!(token.expose(), "s3cr3t-token");
}

#[test]
fn a_window_increment_of_2_pow_31_minus_1_decodes_and_one_more_is_malformed() {
    let window = |increment: u32| {
        let mut b = BytesMut::new();
        Header {
            kind: FrameKind::WINDOW,
            flags: 0,
            stream: StreamId(1),
            len: 4,
        }
        .encode(&mut b);
        b.extend_from_slice(&increment.to_be_bytes());
        FrameCodec::with_max_payload(MAX_PAYLOAD_LIMIT).decode(&mut b)
    };
    assert_eq!(
        window(MAX_WINDOW).unwrap(),
        Some(Frame::Window(WindowUpdate {
            stream: StreamId(1),
            increment: MAX_WINDOW
        }))
    );
    assert!(window(MAX_WINDOW + 1).is_err());
}
