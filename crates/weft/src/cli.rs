//! The command-line interface (`weft --help`).

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// weft — a container network fabric for Kubernetes-style clusters.
///
/// One binary holds everything. Installed under a CNI plugin's name (bridge, host-local, portmap,
/// loopback, ptp) it is that plugin, taking the same JSON as the reference plugins. Called by a
/// container runtime as `weft` (CNI_COMMAND set) it is the meta plugin that gives pods an address
/// in the node's leased subnet. Run by hand it is this command-line tool.
#[derive(Parser)]
#[command(name = "weft", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Manage weft's CNI plugins.
    #[command(subcommand)]
    Cni(CniCommand),
    /// Run one CNI plugin explicitly (as if invoked under its name): `weft plugin bridge`.
    Plugin {
        /// The plugin type: bridge, host-local, portmap, loopback, ptp or weft.
        name: String,
    },
    /// Show weft's plugins giving two containers a network, in namespaces made for the demo
    /// and removed afterwards. Needs root.
    Demo,
}

#[derive(Subcommand)]
enum CniCommand {
    /// Lay weft's plugins down in DIR (e.g. /opt/cni/bin): the weft binary and one symlink per
    /// plugin name. Refuses to replace a file that is not weft's unless --force.
    Install {
        /// The directory a container runtime looks for plugins in (its CNI_PATH).
        #[arg(long, default_value = "/opt/cni/bin")]
        dir: PathBuf,
        /// Replace existing files even when they are not weft's (another vendor's plugins).
        #[arg(long)]
        force: bool,
    },
    /// List the plugin types weft provides.
    List,
    /// Delete a veth retired by a plugin's DEL (started by the plugins themselves).
    #[command(hide = true)]
    Reap {
        #[arg(long)]
        name: String,
        #[arg(long)]
        index: u32,
    },
}

pub fn main() -> i32 {
    let cli = Cli::parse();
    let outcome = match cli.command {
        Command::Cni(CniCommand::Install { dir, force }) => crate::install::install(&dir, force),
        Command::Cni(CniCommand::List) => {
            for name in weft_plugins::PLUGIN_NAMES {
                println!("{name}");
            }
            Ok(())
        }
        Command::Cni(CniCommand::Reap { name, index }) => {
            weft_plugins::teardown::reap(&name, index).map_err(|e| anyhow::anyhow!("reaping {name}: {e}"))
        }
        Command::Plugin { name } => match weft_plugins::by_name(&name) {
            Some(plugin) => return crate::run_plugin(plugin.as_ref()),
            None => Err(anyhow::anyhow!(
                "unknown plugin {name:?}; weft provides: {}",
                weft_plugins::PLUGIN_NAMES.join(", ")
            )),
        },
        Command::Demo => crate::demo::run(),
    };
    match outcome {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("weft: {e:#}");
            1
        }
    }
}
