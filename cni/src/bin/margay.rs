//! The `margay` CNI plugin: attaches pods with cali veths and /32 host routes.

// The allocator's JSON documents and the agents' caches allocate a lot; glibc's malloc was a
// third of the IPAM client's CPU (docs/benchmarks.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    std::process::exit(margay_cni::run_plugin(margay_cni::PluginType::Main))
}
