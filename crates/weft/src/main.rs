//! The `weft` binary. Invoked under a CNI plugin's type name (`bridge`, `host-local`, ... through
//! a symlink or copy) it is that plugin and nothing else runs: no argument parsing, no runtime.
//! Named `weft` it is the meta plugin when `CNI_COMMAND` is set. Otherwise it is the CLI.

/// `print!` for the CLI: output into a closed pipe (`weft lab show | head -1`) ends the process
/// quietly with status 0 instead of panicking.
macro_rules! out {
    ($($arg:tt)*) => { $crate::output::write(format_args!($($arg)*), false) };
}

/// `println!` for the CLI, like [`out!`].
macro_rules! outln {
    () => { $crate::output::write(format_args!(""), true) };
    ($($arg:tt)*) => { $crate::output::write(format_args!($($arg)*), true) };
}

mod bgp;
mod cli;
mod demo;
mod install;
mod lab;
mod output;

use std::path::Path;

fn main() {
    let argv0 = std::env::args_os().next().unwrap_or_default();
    let name = Path::new(&argv0).file_name().and_then(|n| n.to_str()).unwrap_or("weft").to_string();
    // Named `weft`, the binary is the meta plugin when a runtime calls it (CNI_COMMAND set, and
    // runtimes never pass arguments) and the CLI otherwise.
    let as_plugin = name != "weft" || (std::env::var_os("CNI_COMMAND").is_some() && std::env::args_os().len() == 1);
    if let Some(plugin) = weft_plugins::by_name(&name).filter(|_| as_plugin) {
        std::process::exit(run_plugin(plugin.as_ref()));
    }
    std::process::exit(cli::main());
}

/// Runs a plugin with the process' environment and standard streams.
pub fn run_plugin(plugin: &dyn weft_cni::skel::Plugin) -> i32 {
    let env = |key: &str| std::env::var(key).ok();
    let (stdin, stdout, stderr) = (std::io::stdin(), std::io::stdout(), std::io::stderr());
    weft_cni::skel::run(
        plugin,
        weft_cni::skel::Io {
            env: &env,
            stdin: &mut stdin.lock(),
            stdout: &mut stdout.lock(),
            stderr: &mut stderr.lock(),
        },
    )
}
