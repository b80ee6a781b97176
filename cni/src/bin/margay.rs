//! The `margay` CNI plugin: attaches pods with cali veths and /32 host routes.

fn main() {
    std::process::exit(margay_cni::run_plugin(margay_cni::PluginType::Main))
}
