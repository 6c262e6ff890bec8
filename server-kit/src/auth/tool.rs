//! The `hash-secret` and `new-token` commands of the server binaries, which make what a
//! `[[users]]` entry stores.

use std::io::BufRead;
use std::process::ExitCode;

use super::users::{hash_secret, new_token};

/// What the commands do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tool {
    /// Read a password from the first line of stdin, print its argon2 hash.
    HashSecret,
    /// Print a new token and the digest line that stores it.
    NewToken,
}

/// Runs `tool`, printing to stdout (errors to stderr, exit status 1).
pub fn run(tool: Tool) -> ExitCode {
    let result = match tool {
        Tool::HashSecret => read_password().and_then(|password| {
            hash_secret(&password)
                .map(|hash| format!("secret = \"{hash}\""))
                .map_err(|e| e.to_string())
        }),
        Tool::NewToken => {
            let (token, stored) = new_token();
            Ok(format!(
                "# give the client this token (shown once): {token}\ntokens = [\"{stored}\"]"
            ))
        }
    };
    match result {
        Ok(text) => {
            println!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The first line of stdin, without its line end: a password on the command line would
/// show in `ps` and the shell's history.
fn read_password() -> Result<String, String> {
    let mut line = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut line)
        .map_err(|e| format!("cannot read the password from stdin: {e}"))?;
    let password = line.trim_end_matches(['\r', '\n']);
    if password.is_empty() {
        return Err("no password on stdin: echo 's3cret' | qbus-broker hash-secret".into());
    }
    Ok(password.to_owned())
}
