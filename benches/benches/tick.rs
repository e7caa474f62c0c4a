//! Criterion benches: the simulation step alone, and the full server tick (inputs + simulation +
//! snapshot + per-client delta encoding) for several client and entity counts.

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use quicktick_benches::{arena, loaded_core, step};
use quicktick_shared::sim::{SimConfig, World};
use quicktick_shared::tick::Tick;

fn sim_step(c: &mut Criterion) {
    let mut g = c.benchmark_group("sim_step");
    for npcs in [200usize, 1000, 5000] {
        let mut w = World::new(
            arena(),
            SimConfig {
                tick_rate: 60,
                npc_count: npcs,
                seed: 1,
            },
            Tick(0),
        );
        let mut ev = Vec::new();
        g.throughput(Throughput::Elements(npcs as u64));
        g.bench_with_input(BenchmarkId::from_parameter(npcs), &npcs, |b, _| {
            b.iter(|| {
                ev.clear();
                w.step(&[], &mut ev);
                black_box(w.tick())
            });
        });
    }
    g.finish();
}

fn server_tick(c: &mut Criterion) {
    let mut g = c.benchmark_group("server_tick");
    g.sample_size(30);
    for (clients, npcs) in [(16usize, 200usize), (64, 200), (64, 1000)] {
        let (mut core, conns) = loaded_core(clients, npcs);
        let mut out = Vec::new();
        g.throughput(Throughput::Elements((clients * (npcs + clients)) as u64));
        g.bench_function(
            BenchmarkId::from_parameter(format!("{clients}c_{npcs}npc")),
            |b| {
                b.iter(|| black_box(step(&mut core, &conns, &mut out)));
            },
        );
    }
    g.finish();
}

criterion_group!(benches, sim_step, server_tick);
criterion_main!(benches);
