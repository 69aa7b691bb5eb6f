//! `understudy keygen`: a Noise static key pair for the replication channel.

use std::path::PathBuf;

use anyhow::Context;
use understudy_checkpoint::channel::{KeyPair, write_key_files};

/// Arguments of `understudy keygen`.
#[derive(clap::Args, Debug)]
pub struct KeygenArguments {
    /// Writes PREFIX.key (private, mode 0600) and PREFIX.pub (public, for
    /// the peers' --peer-key); never overwrites an existing file.
    #[arg(long)]
    out: PathBuf,
}

/// Makes and writes the key pair.
pub fn keygen(arguments: KeygenArguments) -> anyhow::Result<()> {
    let keypair = KeyPair::generate()?;
    let (private, public) = write_key_files(&arguments.out, &keypair).with_context(|| {
        format!(
            "cannot write the key files {}.key/.pub",
            arguments.out.display()
        )
    })?;
    crate::say!(
        "wrote {} (keep it on this host) and {} (public key {})",
        private.display(),
        public.display(),
        keypair.public
    );
    Ok(())
}
