//! tether-agent: the flags (`tether_agent::cli`) into a running agent, nothing more.

/// jemalloc, as in tether-server (docs/ARCHITECTURE.md, "Read buffers").
#[cfg(all(unix, not(target_env = "musl"), feature = "jemalloc"))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    match tether_agent::cli::main() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tether-agent: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
