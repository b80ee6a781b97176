//! 4-octet AS numbers towards and from speakers without them (RFC 6793 §4.2).

use crate::attribute::{AsPath, AsSegment, PathAttribute};
use crate::update::Update;
use crate::AS_TRANS;

/// Rebuilds the AS path from AS_PATH (with AS_TRANS) and AS4_PATH, RFC 6793 §4.2.3:
/// the leading ASes of AS_PATH that AS4_PATH does not cover, then AS4_PATH. If
/// AS_PATH is the shorter, AS4_PATH is ignored. Confederation segments in AS4_PATH
/// are ignored (they must not appear there).
pub fn merge_as_path(as_path: &AsPath, as4_path: &AsPath) -> AsPath {
    let as4 = AsPath {
        segments: as4_path
            .segments
            .iter()
            .filter(|s| !s.kind.is_confed())
            .cloned()
            .collect(),
    };
    let n = as_path.route_len();
    let n4 = as4.route_len();
    if n < n4 {
        return as_path.clone();
    }
    let mut needed = n - n4;
    let mut out = Vec::new();
    for seg in &as_path.segments {
        if seg.kind.is_confed() {
            // Confederation segments count for nothing and sit at the front.
            if needed > 0 || out.iter().all(|s: &AsSegment| s.kind.is_confed()) {
                out.push(seg.clone());
            }
            continue;
        }
        if needed == 0 {
            break;
        }
        match seg.kind {
            crate::attribute::SegmentKind::Set => {
                out.push(seg.clone());
                needed -= 1;
            }
            _ => {
                let take = needed.min(seg.asns.len());
                out.push(AsSegment {
                    kind: seg.kind,
                    asns: seg.asns[..take].to_vec(),
                });
                needed -= take;
            }
        }
    }
    out.extend(as4.segments);
    // Adjacent sequences from the two halves read as one.
    let mut merged: Vec<AsSegment> = Vec::with_capacity(out.len());
    for s in out {
        match merged.last_mut() {
            Some(last)
                if last.kind == crate::attribute::SegmentKind::Sequence
                    && s.kind == crate::attribute::SegmentKind::Sequence =>
            {
                last.asns.extend(s.asns)
            }
            _ => merged.push(s),
        }
    }
    AsPath { segments: merged }
}

impl Update {
    /// For an UPDATE from a 2-octet-AS peer: fold AS4_PATH and AS4_AGGREGATOR into
    /// AS_PATH and AGGREGATOR (RFC 6793 §4.2.3) and remove them. If AGGREGATOR is not
    /// AS_TRANS, both AS4 attributes are ignored.
    pub fn reconstruct_as4(&mut self) {
        let as4_path = self.attributes.iter().find_map(|a| match a {
            PathAttribute::As4Path(p) => Some(p.clone()),
            _ => None,
        });
        let as4_agg = self.attributes.iter().find_map(|a| match a {
            PathAttribute::As4Aggregator(g) => Some(*g),
            _ => None,
        });
        let agg_as = self.attributes.iter().find_map(|a| match a {
            PathAttribute::Aggregator(g) => Some(g.asn),
            _ => None,
        });
        let ignore = matches!(agg_as, Some(a) if a != u32::from(AS_TRANS)) && as4_agg.is_some();
        self.attributes.retain(|a| {
            !matches!(
                a,
                PathAttribute::As4Path(_) | PathAttribute::As4Aggregator(_)
            )
        });
        if ignore {
            return;
        }
        for a in &mut self.attributes {
            match a {
                PathAttribute::AsPath(p) => {
                    if let Some(p4) = &as4_path {
                        *p = merge_as_path(p, p4);
                    }
                }
                PathAttribute::Aggregator(g) => {
                    if let Some(g4) = as4_agg {
                        *g = g4;
                    }
                }
                _ => {}
            }
        }
    }

    /// For an UPDATE to a 2-octet-AS peer (RFC 6793 §4.2.2): add AS4_PATH when
    /// AS_PATH holds an AS above 65535, and AS4_AGGREGATOR when AGGREGATOR does.
    /// Encoding then writes AS_TRANS in their place.
    pub fn prepare_for_two_octet_peer(&mut self) {
        let big = |a: &u32| *a > u32::from(u16::MAX);
        let mut extra = Vec::new();
        for a in &self.attributes {
            match a {
                PathAttribute::AsPath(p) if p.segments.iter().any(|s| s.asns.iter().any(big)) => {
                    extra.push(PathAttribute::As4Path(AsPath {
                        segments: p
                            .segments
                            .iter()
                            .filter(|s| !s.kind.is_confed())
                            .cloned()
                            .collect(),
                    }))
                }
                PathAttribute::Aggregator(g) if big(&g.asn) => {
                    extra.push(PathAttribute::As4Aggregator(*g))
                }
                _ => {}
            }
        }
        self.attributes.retain(|a| {
            !matches!(
                a,
                PathAttribute::As4Path(_) | PathAttribute::As4Aggregator(_)
            )
        });
        self.attributes.extend(extra);
    }
}
