//! Frame codec: encode and decode of a typical message frame (200-byte payload) and of a batch
//! of 64 such frames in one buffer, as a server reading a busy socket sees them.

use std::hint::black_box;

use bytes::{Bytes, BytesMut};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use tern_protocol::{Codec, ContentType, Deliver, Frame, Send, Target};

const PAYLOAD: usize = 200;
const BATCH: usize = 64;

fn send_frame(i: u64) -> Frame {
    Frame::new(
        i + 1,
        Send {
            client_msg_id: format!("0195b3c2-7d1e-7a4f-9c3b-{i:012x}"),
            target: Some(Target::user("user-000042")),
            content_type: ContentType::Text as u32,
            custom_type: String::new(),
            payload: Bytes::from(vec![b'x'; PAYLOAD]),
            priority: false,
        },
    )
}

fn deliver_frame(i: u64) -> Frame {
    Frame::new(
        0,
        Deliver {
            conversation_id: 0x1234_5678_9abc,
            seq: 1_000_000 + i,
            sender: "user-000041".into(),
            target: Some(Target::user("user-000041")),
            server_time_ms: 1_700_000_000_000 + i,
            client_msg_id: format!("0195b3c2-7d1e-7a4f-9c3b-{i:012x}"),
            content_type: ContentType::Text as u32,
            custom_type: String::new(),
            payload: Bytes::from(vec![b'x'; PAYLOAD]),
            recalled: false,
        },
    )
}

fn bench_kind(c: &mut Criterion, name: &str, make: fn(u64) -> Frame) {
    let mut codec = Codec::default();
    let one = make(0);
    let one_wire = codec.encode_to_bytes(&one).expect("encode");
    let batch: Vec<Frame> = (0..BATCH as u64).map(make).collect();
    let mut batch_wire = BytesMut::new();
    for frame in &batch {
        codec.encode(frame, &mut batch_wire).expect("encode");
    }
    let batch_wire = batch_wire.freeze();

    let mut group = c.benchmark_group(format!("codec/{name}"));

    group.throughput(Throughput::Elements(1));
    let mut out = BytesMut::with_capacity(one_wire.len());
    group.bench_function("encode", |b| {
        b.iter(|| {
            out.clear();
            codec.encode(black_box(&one), &mut out).expect("encode");
            black_box(&out);
        })
    });
    group.bench_function("decode", |b| {
        b.iter(|| {
            // Copying the wire bytes in stands for the socket read; it is part of the real cost.
            let mut buf = BytesMut::from(&one_wire[..]);
            black_box(
                codec
                    .decode(&mut buf)
                    .expect("decode")
                    .expect("whole frame"),
            )
        })
    });

    group.throughput(Throughput::Elements(BATCH as u64));
    let mut out = BytesMut::with_capacity(batch_wire.len());
    group.bench_function("encode_batch_64", |b| {
        b.iter(|| {
            out.clear();
            for frame in black_box(&batch) {
                codec.encode(frame, &mut out).expect("encode");
            }
            black_box(&out);
        })
    });
    group.bench_function("decode_batch_64", |b| {
        b.iter(|| {
            let mut buf = BytesMut::from(&batch_wire[..]);
            let mut n = 0;
            while let Some(frame) = codec.decode(&mut buf).expect("decode") {
                black_box(frame);
                n += 1;
            }
            assert_eq!(n, BATCH);
        })
    });
    group.finish();
}

fn codec(c: &mut Criterion) {
    bench_kind(c, "send", send_frame);
    bench_kind(c, "deliver", deliver_frame);
}

criterion_group!(benches, codec);
criterion_main!(benches);
