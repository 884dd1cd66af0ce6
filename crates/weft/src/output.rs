//! The CLI's standard output (see the `out!` and `outln!` macros).

use std::io::{ErrorKind, Write};

/// Writes `args` (and a newline) to standard output. A reader that went away (a closed pipe)
/// ends the process quietly: what it did not read is not an error of this command. Any other
/// failure is reported once on standard error, and the process exits with status 1.
pub fn write(args: std::fmt::Arguments<'_>, newline: bool) {
    let mut out = std::io::stdout().lock();
    let written = out.write_fmt(args).and_then(|()| if newline { out.write_all(b"\n") } else { Ok(()) });
    match written.and_then(|()| if newline { out.flush() } else { Ok(()) }) {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::BrokenPipe => std::process::exit(0),
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "weft: writing to standard output: {e}");
            std::process::exit(1);
        }
    }
}
