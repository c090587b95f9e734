//! Resource sets: named quantities (CPU, GPU, memory, custom) with fractional amounts.
//!
//! Amounts are fixed-point with 1/10,000 resolution, as in Ray, so repeated acquire/release of
//! fractional amounts never drifts the way `f64` sums do.
//!
//! Invariants: every amount is ≥ 0; a zero amount is not stored; `subtract` either succeeds
//! completely or changes nothing.

use std::collections::BTreeMap;

/// Units per whole resource.
pub const RESOLUTION: i64 = 10_000;
/// Largest amount accepted for one resource (fits the fixed-point range with ample margin).
pub const MAX_AMOUNT: f64 = 1e12;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ResourceError {
    #[error("resource name {0:?} is invalid: expected 1..=128 characters of [A-Za-z0-9_.:/-]")]
    BadName(String),
    #[error("resource {name} = {value} is invalid: expected a finite amount in 0..={MAX_AMOUNT}")]
    BadAmount { name: String, value: f64 },
    #[error("not enough {name}: asked for {asked}, {available} available")]
    Insufficient {
        name: String,
        asked: f64,
        available: f64,
    },
}

/// Ordered and hashable, so a set can key the shapes tasks are queued and leased by.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ResourceSet(BTreeMap<String, i64>);

fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 128
        && n.chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.:/-".contains(c))
}

fn to_units(name: &str, v: f64) -> Result<i64, ResourceError> {
    if !v.is_finite() || !(0.0..=MAX_AMOUNT).contains(&v) {
        return Err(ResourceError::BadAmount {
            name: name.to_string(),
            value: v,
        });
    }
    Ok((v * RESOLUTION as f64).round() as i64)
}

fn to_amount(units: i64) -> f64 {
    units as f64 / RESOLUTION as f64
}

impl ResourceSet {
    pub fn new() -> Self {
        Self::default()
    }

    /// The amounts in fixed-point units (1/10,000), for arithmetic-heavy callers.
    pub fn units(&self) -> impl Iterator<Item = (&str, i64)> {
        self.0.iter().map(|(k, v)| (k.as_str(), *v))
    }

    /// A set from fixed-point units (names already valid, as `units` gave them).
    pub fn from_units<'a>(pairs: impl IntoIterator<Item = (&'a str, i64)>) -> Self {
        Self(
            pairs
                .into_iter()
                .filter(|(_, v)| *v > 0)
                .map(|(k, v)| (k.to_owned(), v))
                .collect(),
        )
    }

    /// Builds a set from `(name, amount)` pairs, validating both.
    pub fn from_map<'a>(
        pairs: impl IntoIterator<Item = (&'a str, f64)>,
    ) -> Result<Self, ResourceError> {
        let mut m = BTreeMap::new();
        for (name, v) in pairs {
            if !valid_name(name) {
                return Err(ResourceError::BadName(name.chars().take(140).collect()));
            }
            let u = to_units(name, v)?;
            if u > 0 {
                m.insert(name.to_string(), u);
            }
        }
        Ok(Self(m))
    }

    pub fn to_map(&self) -> BTreeMap<String, f64> {
        self.0
            .iter()
            .map(|(k, v)| (k.clone(), to_amount(*v)))
            .collect()
    }

    pub fn get(&self, name: &str) -> f64 {
        to_amount(self.0.get(name).copied().unwrap_or(0))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// `(name, amount)` of every non-zero resource, by name.
    pub fn iter(&self) -> impl Iterator<Item = (&str, f64)> {
        self.0.iter().map(|(k, v)| (k.as_str(), to_amount(*v)))
    }

    /// The highest fraction in use of any resource this set (the total) has, given what is
    /// still `available` and what `demand` would add: Ray's critical-resource utilisation.
    pub fn utilization(&self, available: &ResourceSet, demand: &ResourceSet) -> f64 {
        self.0
            .iter()
            .filter(|(_, t)| **t > 0)
            .map(|(k, t)| {
                let avail = available.0.get(k).copied().unwrap_or(0).min(*t);
                let used = t - avail + demand.0.get(k).copied().unwrap_or(0);
                used as f64 / *t as f64
            })
            .fold(0.0, f64::max)
    }

    /// Whether every amount in `other` is available here.
    pub fn contains(&self, other: &ResourceSet) -> bool {
        other
            .0
            .iter()
            .all(|(k, v)| self.0.get(k).copied().unwrap_or(0) >= *v)
    }

    pub fn add(&mut self, other: &ResourceSet) {
        for (k, v) in &other.0 {
            *self.0.entry(k.clone()).or_insert(0) += v;
        }
    }

    /// Takes `other` out even where that goes below zero (a CPU taken back from a blocked
    /// task while another task uses it); `contains` is false for any demand until it is
    /// positive again.
    pub fn subtract_allowing_debt(&mut self, other: &ResourceSet) {
        for (k, v) in &other.0 {
            let e = self.0.entry(k.clone()).or_insert(0);
            *e -= v;
            if *e == 0 {
                self.0.remove(k);
            }
        }
    }

    /// All amounts but those of `names`.
    pub fn without(&self, names: &[&str]) -> ResourceSet {
        ResourceSet(
            self.0
                .iter()
                .filter(|(k, _)| !names.contains(&k.as_str()))
                .map(|(k, v)| (k.clone(), *v))
                .collect(),
        )
    }

    /// Only the amounts of `names`.
    pub fn only(&self, names: &[&str]) -> ResourceSet {
        ResourceSet(
            self.0
                .iter()
                .filter(|(k, _)| names.contains(&k.as_str()))
                .map(|(k, v)| (k.clone(), *v))
                .collect(),
        )
    }

    /// Takes `other` out of this set; fails without changing anything if any amount is short.
    pub fn subtract(&mut self, other: &ResourceSet) -> Result<(), ResourceError> {
        for (k, v) in &other.0 {
            let have = self.0.get(k).copied().unwrap_or(0);
            if have < *v {
                return Err(ResourceError::Insufficient {
                    name: k.clone(),
                    asked: to_amount(*v),
                    available: to_amount(have),
                });
            }
        }
        for (k, v) in &other.0 {
            let e = self.0.entry(k.clone()).or_insert(0);
            *e -= v;
            if *e == 0 {
                self.0.remove(k);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn set(pairs: &[(&str, f64)]) -> ResourceSet {
        ResourceSet::from_map(pairs.iter().copied()).unwrap()
    }

    #[test]
    fn validation() {
        assert!(matches!(
            ResourceSet::from_map([("CPU", -1.0)]),
            Err(ResourceError::BadAmount { .. })
        ));
        assert!(matches!(
            ResourceSet::from_map([("CPU", f64::NAN)]),
            Err(ResourceError::BadAmount { .. })
        ));
        assert!(matches!(
            ResourceSet::from_map([("", 1.0)]),
            Err(ResourceError::BadName(_))
        ));
        assert!(matches!(
            ResourceSet::from_map([("a b", 1.0)]),
            Err(ResourceError::BadName(_))
        ));
        assert!(set(&[("CPU", 0.0)]).is_empty());
        assert_eq!(
            set(&[("accelerator_type:A100", 1.0)]).get("accelerator_type:A100"),
            1.0
        );
    }

    #[test]
    fn fractional_amounts_do_not_drift() {
        let mut total = set(&[("GPU", 1.0)]);
        let tenth = set(&[("GPU", 0.1)]);
        for _ in 0..10 {
            total.subtract(&tenth).unwrap();
        }
        assert!(total.is_empty(), "{total:?}");
        assert!(matches!(
            total.subtract(&tenth),
            Err(ResourceError::Insufficient { .. })
        ));
    }

    proptest! {
        #[test]
        fn subtract_never_goes_negative_and_add_undoes_it(
            a in proptest::collection::vec(0.0f64..100.0, 3),
            b in proptest::collection::vec(0.0f64..100.0, 3),
        ) {
            let names = ["CPU", "GPU", "memory"];
            let x = ResourceSet::from_map(names.iter().copied().zip(a.iter().copied())).unwrap();
            let y = ResourceSet::from_map(names.iter().copied().zip(b.iter().copied())).unwrap();
            let mut z = x.clone();
            match z.subtract(&y) {
                Ok(()) => {
                    prop_assert!(x.contains(&y));
                    prop_assert!(z.0.values().all(|v| *v > 0));
                    z.add(&y);
                    prop_assert_eq!(z, x);
                }
                Err(_) => {
                    prop_assert!(!x.contains(&y));
                    prop_assert_eq!(z, x);
                }
            }
        }
    }
}
