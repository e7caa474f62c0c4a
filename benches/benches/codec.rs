//! Criterion benches of the snapshot codec: encode one client's delta for 1000 entities with 10 % and
//! 100 % of them changed, and decode + apply it on the client side.

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use quicktick_benches::cubes::{Cubes, CUBES_WORLD};
use quicktick_shared::delta::{apply_part, decode_part, Codec, SnapshotEncoder};
use quicktick_shared::snapshot::Snapshot;

fn scene(moving: f32) -> (Snapshot, Snapshot) {
    let mut c = Cubes::new(1000, moving, 60, 42);
    let mut hist = Vec::new();
    for _ in 0..120 {
        hist.push(c.step());
    }
    let new = hist.pop().unwrap_or_default();
    let _ = hist.pop();
    let base = hist.pop().unwrap_or_default(); // acked two ticks back
    (base, new)
}

fn codec(c: &mut Criterion) {
    let codec = Codec::new(CUBES_WORLD, CUBES_WORLD, 60);
    let mut g = c.benchmark_group("encode_1k");
    for moving in [0.1f32, 1.0] {
        let (base, new) = scene(moving);
        let mut enc = SnapshotEncoder::new();
        let mut out = Vec::new();
        g.throughput(Throughput::Elements(1000));
        g.bench_with_input(
            BenchmarkId::from_parameter(format!("{}pct", (moving * 100.0) as u32)),
            &moving,
            |b, _| {
                b.iter(|| {
                    out.clear();
                    black_box(
                        enc.encode(&codec, &new, Some(&base), None, 1162, &mut out)
                            .map(|s| s.bytes)
                            .unwrap_or(0),
                    )
                });
            },
        );
    }
    g.finish();
    let mut g = c.benchmark_group("decode_apply_1k");
    for moving in [0.1f32, 1.0] {
        let (base, new) = scene(moving);
        let mut out = Vec::new();
        let _ = SnapshotEncoder::new().encode(&codec, &new, Some(&base), None, 1162, &mut out);
        g.throughput(Throughput::Elements(1000));
        g.bench_with_input(
            BenchmarkId::from_parameter(format!("{}pct", (moving * 100.0) as u32)),
            &moving,
            |b, _| {
                b.iter(|| {
                    let mut n = 0;
                    for d in &out {
                        if let Ok(p) = decode_part(d, &codec) {
                            n += apply_part(Some(&base), &p, &codec).map_or(0, |v| v.len());
                        }
                    }
                    black_box(n)
                });
            },
        );
    }
    g.finish();
}

criterion_group!(benches, codec);
criterion_main!(benches);
