//! `keyfort card ...`: the ceremony and card inspection (owned by the card work).
//!
//! PINs are read from `KEYFORT_PIN_FILE` / `KEYFORT_SO_PIN_FILE` (or `KEYFORT_PIN` /
//! `KEYFORT_SO_PIN`), never from arguments, and are never printed.

use clap::Subcommand;
use keyfort_hsm::softhsm::open_token_dir;
use keyfort_hsm::{init_card, Card, CeremonyKit, PartitionId, Pin};
use std::path::{Path, PathBuf};

#[derive(Debug, Subcommand)]
pub enum CardCmd {
    /// Development only: make a ceremony kit (vendor KBK + adapter KBK wrapped under it). In
    /// production the vendor KBK is in the card from the factory and the wrapped adapter KBK comes
    /// from the realm's safe.
    CeremonyKit {
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value = "dev-vendor")]
        vendor: String,
        #[arg(long, default_value = "dev-realm")]
        realm: String,
        /// Reuse the vendor KBK of this kit (a second realm of the same vendor).
        #[arg(long)]
        same_vendor_as: Option<PathBuf>,
    },
    /// Initialise a token and load its ownership layers from a kit (SO and user PIN from env).
    Init {
        #[arg(long)]
        token_dir: PathBuf,
        #[arg(long)]
        label: String,
        #[arg(long)]
        kit: PathBuf,
    },
    /// Print a card's label, realm fingerprints and object counts.
    Info {
        #[arg(long)]
        token_dir: PathBuf,
        #[arg(long)]
        label: String,
    },
    /// Create a partition on a card and write its config (wrapped under the adapter KBK).
    PartitionCreate {
        #[arg(long)]
        token_dir: PathBuf,
        #[arg(long)]
        label: String,
        /// 32 hex digits; random when absent.
        #[arg(long)]
        partition: Option<String>,
        #[arg(long)]
        out: PathBuf,
    },
    /// Check that a partition config imports on a card (same vendor and realm).
    PartitionImport {
        #[arg(long)]
        token_dir: PathBuf,
        #[arg(long)]
        label: String,
        #[arg(long)]
        config: PathBuf,
    },
}

pub fn run(cmd: CardCmd) -> crate::CmdResult {
    match cmd {
        CardCmd::CeremonyKit {
            out,
            vendor,
            realm,
            same_vendor_as,
        } => ceremony_kit(&out, &vendor, &realm, same_vendor_as.as_deref()),
        CardCmd::Init {
            token_dir,
            label,
            kit,
        } => {
            let hsm = open_token_dir(&token_dir).map_err(s)?;
            let kit = CeremonyKit::read(&kit).map_err(s)?;
            let so = Pin::so_from_env().map_err(s)?;
            let user = Pin::user_from_env().map_err(s)?;
            let card = init_card(hsm, &label, &so, &user, &kit).map_err(s)?;
            println!(
                "card {label}: vendor {} adapter {} (vendor {:?}, realm {:?})",
                card.identity().vendor,
                card.identity().adapter,
                kit.vendor,
                kit.realm
            );
            Ok(())
        }
        CardCmd::Info { token_dir, label } => {
            let card = open(&token_dir, &label)?;
            let session = card.session().map_err(s)?;
            println!("label            {}", card.label());
            println!("vendor           {}", card.identity().vendor);
            println!("adapter (realm)  {}", card.identity().adapter);
            println!("token objects    {}", card.token_object_count().map_err(s)?);
            println!(
                "session objects  {}",
                session.session_object_count().map_err(s)?
            );
            Ok(())
        }
        CardCmd::PartitionCreate {
            token_dir,
            label,
            partition,
            out,
        } => {
            let card = open(&token_dir, &label)?;
            let id = match partition {
                Some(h) => parse_id(&h)?,
                None => PartitionId::random(),
            };
            let config = card
                .session()
                .and_then(|mut c| c.create_partition(id))
                .map_err(s)?;
            std::fs::write(&out, &config).map_err(|e| format!("{}: {e}", out.display()))?;
            println!("partition {id}: config written to {}", out.display());
            Ok(())
        }
        CardCmd::PartitionImport {
            token_dir,
            label,
            config,
        } => {
            let card = open(&token_dir, &label)?;
            let bytes = std::fs::read(&config).map_err(|e| format!("{}: {e}", config.display()))?;
            let id = card
                .session()
                .and_then(|mut c| c.import_partition(&bytes))
                .map_err(s)?;
            println!("partition {id}: imports on card {label}");
            Ok(())
        }
    }
}

fn s(e: keyfort_hsm::CardError) -> String {
    e.to_string()
}

fn open(token_dir: &Path, label: &str) -> Result<Card, String> {
    let hsm = open_token_dir(token_dir).map_err(s)?;
    Card::open(hsm, label, Pin::user_from_env().map_err(s)?).map_err(s)
}

fn parse_id(hex: &str) -> Result<PartitionId, String> {
    let err = || format!("partition id must be 32 hex digits, got {hex:?}");
    if hex.len() != 32 {
        return Err(err());
    }
    let mut id = [0u8; 16];
    for (i, b) in id.iter_mut().enumerate() {
        *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|_| err())?;
    }
    Ok(PartitionId(id))
}

fn ceremony_kit(out: &Path, vendor: &str, realm: &str, same: Option<&Path>) -> crate::CmdResult {
    let kit =
        keyfort_hsm::ceremony::make_kit_with_scratch_token(out, vendor, realm, same).map_err(s)?;
    println!(
        "ceremony kit for vendor {:?}, realm {:?} written to {} (development only)",
        kit.vendor,
        kit.realm,
        out.display()
    );
    Ok(())
}
