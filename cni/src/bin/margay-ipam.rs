//! The `margay-ipam` CNI IPAM plugin: addresses from Margay's block allocator.

fn main() {
    std::process::exit(margay_cni::run_plugin(margay_cni::PluginType::Ipam))
}
