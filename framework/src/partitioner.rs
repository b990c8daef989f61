//! Kafka's default partitioner for keyed records (the Java client's `BuiltInPartitioner`:
//! murmur2 of the key bytes, made positive, modulo the partition count), so tests can put a
//! key where a Java producer would.
//!
//! librdkafka's own default (`consistent_random`, CRC-32) places keys differently; set
//! `partitioner=murmur2_random` on librdkafka producers to match Java's.

/// The partition of `topic`'s `partitions` a Java producer's default partitioner picks for a
/// record with key `key`.
pub fn default_partition(key: &[u8], partitions: i32) -> i32 {
    let positive = murmur2(key) & 0x7fff_ffff;
    // Both operands are non-negative: the remainder is too, and below `partitions`.
    (positive % partitions.max(1) as u32) as i32
}

/// MurmurHash2 as Kafka computes it (seed 0x9747b28c, little-endian 4-byte blocks).
fn murmur2(data: &[u8]) -> u32 {
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let mut h: u32 = 0x9747_b28c ^ data.len() as u32;
    let mut blocks = data.chunks_exact(4);
    for block in &mut blocks {
        let mut k = u32::from_le_bytes([block[0], block[1], block[2], block[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M) ^ k;
    }
    let tail = blocks.remainder();
    if !tail.is_empty() {
        for (i, byte) in tail.iter().enumerate().rev() {
            h ^= u32::from(*byte) << (8 * i);
        }
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^ (h >> 15)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Computed with Kafka 4.4.0's `Utils.murmur2` and `Utils.toPositive` (jshell).
    #[test]
    fn matches_kafka() {
        for (key, hash, of_8, of_12) in [
            ("ada", -1_834_195_827, 5, 5),
            ("k1", 1_684_045_097, 1, 5),
            ("card-0042", -831_087_013, 3, 7),
            ("", 275_646_681, 1, 9),
            ("a longer key with spaces", 1_599_555_716, 4, 8),
        ] {
            assert_eq!(murmur2(key.as_bytes()) as i32, hash, "{key:?}");
            assert_eq!(default_partition(key.as_bytes(), 8), of_8, "{key:?}");
            assert_eq!(default_partition(key.as_bytes(), 12), of_12, "{key:?}");
        }
    }
}
