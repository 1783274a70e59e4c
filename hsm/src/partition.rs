//! Partitions: made on one card, exported as a config wrapped under the adapter KBK, imported as
//! session objects on every card of the realm.

use crate::card::CoreSession;
use crate::error::{CardError, Result};
use crate::format::{
    PartitionConfig, PartitionId, PartitionPolicy, PolicyTrailer, WRAPPED_KEY_LEN,
};
use crate::raw;
use crate::templates::{partition_key_generate, partition_key_load, PartitionKeyUse};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::ObjectHandle;

/// The four session objects of a loaded partition, and the policy its config stated (its
/// trailer verified in the card).
#[derive(Debug, Clone, Copy)]
pub struct PartitionKeys {
    pub masking: ObjectHandle,
    pub hmac: ObjectHandle,
    pub credential: ObjectHandle,
    pub backup: ObjectHandle,
    pub policy: PartitionPolicy,
}

impl PartitionKeys {
    pub fn handles(&self) -> [ObjectHandle; 4] {
        [self.masking, self.hmac, self.credential, self.backup]
    }
}

impl CoreSession {
    /// Makes a partition's masking, HMAC, credential and backup keys in this card and returns the
    /// partition config (docs/format.md §2.3). The born keys are destroyed and the partition is
    /// loaded from the config, so the creating card holds exactly what every other card holds.
    /// No policy flags: the 245-byte config, no trailer.
    pub fn create_partition(&mut self, partition: PartitionId) -> Result<Vec<u8>> {
        self.create_partition_with(partition, PartitionPolicy::default())
    }

    /// [`Self::create_partition`] with a policy: a policy with flags is stated in a trailer
    /// after the config, its HMAC made here with the partition HMAC key over the config's HMAC
    /// and the flags (docs/format.md §2.3); a policy without flags makes no trailer.
    pub fn create_partition_with(
        &mut self,
        partition: PartitionId,
        policy: PartitionPolicy,
    ) -> Result<Vec<u8>> {
        let specs = [
            (true, PartitionKeyUse::Wrap),
            (false, PartitionKeyUse::Mac),
            (true, PartitionKeyUse::Derive),
            (true, PartitionKeyUse::Wrap),
        ];
        let mut born = Vec::with_capacity(4);
        let result = (|| -> Result<Vec<u8>> {
            let mut wrapped = [[0u8; WRAPPED_KEY_LEN]; 4];
            for (i, (aes, usage)) in specs.into_iter().enumerate() {
                let mech = if aes {
                    Mechanism::AesKeyGen
                } else {
                    Mechanism::GenericSecretKeyGen
                };
                let h = self
                    .session
                    .generate_key(&mech, &partition_key_generate(aes, usage))?;
                born.push(h);
                wrapped[i] = self.wrap_under_adapter(h, "partition key")?;
            }
            let mut config = PartitionConfig {
                partition,
                vendor: self.identity().vendor,
                adapter: self.identity().adapter,
                masking: wrapped[0],
                hmac: wrapped[1],
                credential: wrapped[2],
                backup: wrapped[3],
                mac: [0; 32],
                policy: None,
            };
            config.mac = self.sign(born[1], &config.authenticated())?;
            if !policy.is_empty() {
                let flags = policy.flags();
                config.policy = Some(PolicyTrailer {
                    flags,
                    mac: self.sign(born[1], &PolicyTrailer::authenticated(&config.mac, flags))?,
                });
            }
            Ok(config.encode())
        })();
        for h in born {
            self.destroy(h);
        }
        let config = result?;
        self.import_partition(&config)?;
        Ok(config)
    }

    pub(crate) fn wrap_under_adapter(
        &self,
        h: ObjectHandle,
        what: &'static str,
    ) -> Result<[u8; WRAPPED_KEY_LEN]> {
        let w = self
            .session
            .wrap_key(&Mechanism::AesKeyWrap, self.adapter_kbk, h)?;
        w.try_into()
            .map_err(|_| CardError::corrupt(what, "wrap is not 40 bytes"))
    }

    /// Checks a config's realm fingerprints against this card: vendor first, then adapter.
    pub(crate) fn check_realm(
        &self,
        what: &'static str,
        vendor: crate::error::Fingerprint,
        adapter: crate::error::Fingerprint,
    ) -> Result<()> {
        let me = self.identity();
        if vendor != me.vendor {
            return Err(CardError::WrongVendor {
                what,
                ours: me.vendor,
                theirs: vendor,
            });
        }
        if adapter != me.adapter {
            return Err(CardError::WrongRealm {
                what,
                ours: me.adapter,
                theirs: adapter,
            });
        }
        Ok(())
    }

    /// Unwraps a key under the adapter KBK. The bytes were authenticated already, or this is the
    /// MAC key that authenticates them: an RFC 3394 integrity failure comes back from SoftHSM as
    /// CKR_GENERAL_ERROR (DESIGN), which is reported as `BadMac`.
    pub(crate) fn load_under_adapter(
        &self,
        wrapped: &[u8; WRAPPED_KEY_LEN],
        aes: bool,
        usage: PartitionKeyUse,
        what: &'static str,
        context: &dyn Fn() -> String,
    ) -> Result<ObjectHandle> {
        raw::unwrap_aes_kw(
            &self.session,
            self.adapter_kbk,
            wrapped,
            &partition_key_load(aes, usage),
        )
        .map_err(|e| match e.rv() {
            Some("GeneralError") | Some("WrappedKeyInvalid") | Some("EncryptedDataInvalid") => {
                CardError::BadMac {
                    what,
                    context: context(),
                }
            }
            _ => e,
        })
    }

    /// Imports a partition config (245 bytes, or 283 with a policy trailer): refuses another
    /// vendor or realm (`WrongVendor`/`WrongRealm`), a tampered config or trailer
    /// (`BadMac`/`Corrupt`), unknown policy flags (`Corrupt`). Re-importing replaces the loaded
    /// objects. The policy is kept with the partition ([`Self::partition_policy`]).
    pub fn import_partition(&mut self, config: &[u8]) -> Result<PartitionId> {
        let c = PartitionConfig::decode(config)?;
        self.check_realm("partition config", c.vendor, c.adapter)?;
        let ctx = || format!("partition {}", c.partition);
        let hmac = self.load_under_adapter(
            &c.hmac,
            false,
            PartitionKeyUse::Mac,
            "partition config",
            &ctx,
        )?;
        let mut loaded = vec![hmac];
        let result = (|| -> Result<PartitionKeys> {
            self.verify_mac(hmac, &c.authenticated(), &c.mac, "partition config", ctx)?;
            if let Some(t) = &c.policy {
                self.verify_mac(
                    hmac,
                    &PolicyTrailer::authenticated(&c.mac, t.flags),
                    &t.mac,
                    "partition policy",
                    ctx,
                )?;
            }
            let mut next = |w: &[u8; WRAPPED_KEY_LEN], aes, usage| -> Result<ObjectHandle> {
                let h = self.load_under_adapter(w, aes, usage, "partition config", &ctx)?;
                loaded.push(h);
                Ok(h)
            };
            Ok(PartitionKeys {
                masking: next(&c.masking, true, PartitionKeyUse::Wrap)?,
                hmac,
                credential: next(&c.credential, true, PartitionKeyUse::Derive)?,
                backup: next(&c.backup, true, PartitionKeyUse::Wrap)?,
                policy: c.policy(),
            })
        })();
        let keys = match result {
            Ok(k) => k,
            Err(e) => {
                for h in loaded {
                    self.destroy(h);
                }
                return Err(e);
            }
        };
        if let Some(old) = self.partitions.insert(c.partition, keys) {
            for h in old.handles() {
                self.destroy(h);
            }
        }
        Ok(c.partition)
    }

    /// Unloads a partition: its four keys and every cached key of it are destroyed.
    pub fn drop_partition(&mut self, partition: &PartitionId) {
        for h in self.cache.remove_partition(partition) {
            self.destroy(h);
        }
        if let Some(p) = self.partitions.remove(partition) {
            for h in p.handles() {
                self.destroy(h);
            }
        }
    }

    /// The policy of a loaded partition (its trailer verified at import); `None`: not loaded.
    pub fn partition_policy(&self, partition: &PartitionId) -> Option<PartitionPolicy> {
        self.partitions.get(partition).map(|k| k.policy)
    }

    pub fn partition_loaded(&self, partition: &PartitionId) -> bool {
        self.partitions.contains_key(partition)
    }

    pub(crate) fn partition(&self, partition: &PartitionId) -> Result<PartitionKeys> {
        self.partitions
            .get(partition)
            .copied()
            .ok_or_else(|| CardError::PartitionNotLoaded(partition.to_string()))
    }

    /// Handles of a loaded partition's keys (audits, threat-model tests).
    pub fn partition_keys(&self, partition: &PartitionId) -> Result<PartitionKeys> {
        self.partition(partition)
    }
}
