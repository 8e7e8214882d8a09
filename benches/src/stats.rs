//! Percentiles and summaries.

/// The `p`-th percentile (0–100) of `sorted` by nearest rank: the smallest value with at
/// least `p`% of the samples at or below it. `None` if empty.
pub fn percentile<T: Copy>(sorted: &[T], p: f64) -> Option<T> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// Minimum, median and maximum of `values` (sorted in place). `None` if empty.
pub fn min_median_max(values: &mut [f64]) -> Option<(f64, f64, f64)> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let n = values.len();
    let median = if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    };
    Some((values[0], median, values[n - 1]))
}

/// The median of `values` (sorted in place).
pub fn median(values: &mut [f64]) -> Option<f64> {
    min_median_max(values).map(|(_, m, _)| m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank() {
        let v: Vec<u32> = (1..=50).collect();
        assert_eq!(percentile(&v, 50.0), Some(25));
        assert_eq!(percentile(&v, 99.0), Some(50));
        let v: Vec<u32> = (1..=100).collect();
        assert_eq!(percentile(&v, 99.0), Some(99));
        assert_eq!(percentile::<u32>(&[], 50.0), None);
        assert_eq!(percentile(&[7], 99.0), Some(7));
    }

    #[test]
    fn summaries() {
        assert_eq!(
            min_median_max(&mut [3.0, 1.0, 2.0, 10.0]),
            Some((1.0, 2.5, 10.0))
        );
        assert_eq!(median(&mut [5.0]), Some(5.0));
    }
}
