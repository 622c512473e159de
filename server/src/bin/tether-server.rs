//! tether-server: the flags (`tether_server::cli`) into a running server, nothing more.

/// jemalloc keeps freed pages for reuse (for 10 s by default), where glibc's malloc returns the
/// large read buffers of a busy tunnel to the kernel and faults them in again: that was a
/// tenth of the CPU time per byte (docs/BENCHMARKS.md).
#[cfg(all(unix, not(target_env = "musl"), feature = "jemalloc"))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    match tether_server::cli::main() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tether-server: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
