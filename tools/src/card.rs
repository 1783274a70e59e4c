//! `keyfort card ...`: the ceremony, card inspection, and single-card key operations on files
//! (the demo drives each node's card through these, one process per card).
//!
//! PINs are read from `KEYFORT_PIN_FILE` / `KEYFORT_SO_PIN_FILE` (or `KEYFORT_PIN` /
//! `KEYFORT_SO_PIN`), never from arguments, and are never printed.

use clap::Subcommand;
use keyfort_hsm::softhsm::open_token_dir;
use keyfort_hsm::{init_card, Card, CeremonyKit, CoreSession, KeyHeader, KeyId, PartitionId, Pin};
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
    /// Make the cluster integrity key in a card and write it wrapped under the adapter KBK
    /// (docs/format.md §2.4): once per cluster; every card of the realm loads the file.
    IntegrityKey {
        #[command(flatten)]
        card: CardAt,
        #[arg(long)]
        out: PathBuf,
    },
    /// Create an AES-256 key in the card under a partition and write its masked blob.
    KeyCreate {
        #[command(flatten)]
        card: CardAt,
        /// The partition config (imported into the card first).
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
    /// AES-256-GCM encrypt a file with a masked key (verified and unwrapped in the card).
    Encrypt {
        #[command(flatten)]
        card: CardAt,
        #[command(flatten)]
        io: KeyIo,
    },
    /// Decrypt an envelope made by `encrypt`, on any card of the partition's realm.
    Decrypt {
        #[command(flatten)]
        card: CardAt,
        #[command(flatten)]
        io: KeyIo,
    },
}

/// Which card: its token directory (one per node) and token label.
#[derive(Debug, clap::Args)]
pub struct CardAt {
    #[arg(long)]
    token_dir: PathBuf,
    #[arg(long)]
    label: String,
}

impl CardAt {
    pub fn label(&self) -> &str {
        &self.label
    }

    /// A session on the card (user PIN from the environment), no integrity key loaded.
    pub fn session_without_integrity_key(&self) -> Result<CoreSession, String> {
        open(&self.token_dir, &self.label)?.session().map_err(s)
    }
}

/// Files of a single-key operation.
#[derive(Debug, clap::Args)]
pub struct KeyIo {
    /// The partition config (imported into the card first).
    #[arg(long)]
    config: PathBuf,
    /// The masked key blob.
    #[arg(long)]
    blob: PathBuf,
    #[arg(long = "in")]
    input: PathBuf,
    #[arg(long)]
    out: PathBuf,
    /// Additional authenticated data, bound to the ciphertext.
    #[arg(long, default_value = "")]
    aad: String,
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
                Some(h) => PartitionId(crate::client_cmd::parse_id(&h, "partition id")?),
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
        CardCmd::IntegrityKey { card: at, out } => {
            let card = open(&at.token_dir, &at.label)?;
            let key = card
                .session()
                .and_then(|mut c| c.create_integrity_key())
                .map_err(s)?;
            write(&out, &key)?;
            println!(
                "cluster integrity key made in card {}: wrapped ({} bytes) written to {}",
                at.label,
                key.len(),
                out.display()
            );
            Ok(())
        }
        CardCmd::KeyCreate { card, config, out } => {
            let mut session = session_with_partition(&card, &config)?;
            let header = KeyHeader::aes(session.1, KeyId::random(), 1);
            let blob = session.0.create_key(&header).map_err(s)?;
            write(&out, &blob)?;
            println!(
                "key {} v1 created in card {}: masked blob ({} bytes) written to {}",
                header.key_id,
                card.label,
                blob.len(),
                out.display()
            );
            Ok(())
        }
        CardCmd::Encrypt { card, io } => {
            let (mut session, _) = session_with_partition(&card, &io.config)?;
            let (blob, input) = (read(&io.blob)?, read(&io.input)?);
            let env = session
                .encrypt(&blob, &input, io.aad.as_bytes())
                .map_err(s)?;
            write(&io.out, &env)?;
            println!("encrypted {} bytes in card {}", input.len(), card.label);
            Ok(())
        }
        CardCmd::Decrypt { card, io } => {
            let (mut session, _) = session_with_partition(&card, &io.config)?;
            let (blob, input) = (read(&io.blob)?, read(&io.input)?);
            let plain = session
                .decrypt(&blob, &input, io.aad.as_bytes())
                .map_err(s)?;
            write(&io.out, &plain)?;
            println!("decrypted {} bytes in card {}", plain.len(), card.label);
            Ok(())
        }
    }
}

fn read(path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))
}

fn write(path: &Path, bytes: &[u8]) -> crate::CmdResult {
    std::fs::write(path, bytes).map_err(|e| format!("{}: {e}", path.display()))
}

/// Opens a session on the card and imports the partition config into it (partition keys are
/// session objects rebuilt from the config, never token objects).
fn session_with_partition(
    at: &CardAt,
    config: &Path,
) -> Result<(CoreSession, PartitionId), String> {
    let card = open(&at.token_dir, &at.label)?;
    let mut session = card.session().map_err(s)?;
    let id = session.import_partition(&read(config)?).map_err(s)?;
    Ok((session, id))
}

fn s(e: keyfort_hsm::CardError) -> String {
    e.to_string()
}

pub(crate) fn open(token_dir: &Path, label: &str) -> Result<Card, String> {
    let hsm = open_token_dir(token_dir).map_err(s)?;
    Card::open(hsm, label, Pin::user_from_env().map_err(s)?).map_err(s)
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
