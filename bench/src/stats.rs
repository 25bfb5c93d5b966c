//! How sure a median of rounds is. On a shared machine single rounds of `direct` vary by a
//! third, so a median of a few rounds says little without its interval.

/// A distribution-free confidence interval for the median of `sorted` (ascending): the
/// order statistics `x(k)` and `x(n+1-k)` with the largest `k` whose coverage, from the
/// binomial distribution with p = 1/2, is at least `confidence`. Nothing is assumed about the
/// rounds' distribution, only that they are independent. `None` when there are too few values
/// for that confidence (fewer than 6 for 95%).
pub fn median_interval(sorted: &[f64], confidence: f64) -> Option<Interval> {
    let n = sorted.len();
    if n == 0 {
        return None;
    }
    // P(X <= j) for X ~ Binomial(n, 1/2), for j = 0, 1, ...
    let half_n = 0.5f64.powi(i32::try_from(n).ok()?);
    let mut below = 0.0;
    let mut choose = 1.0;
    let mut best = None;
    for j in 0..n / 2 {
        below += choose * half_n;
        choose = choose * (n - j) as f64 / (j + 1) as f64;
        // The interval [x(j+1), x(n-j)] misses the median with probability 2 P(X <= j).
        let coverage = 1.0 - 2.0 * below;
        if coverage < confidence {
            break;
        }
        best = Some(Interval {
            low: sorted[j],
            high: sorted[n - 1 - j],
            coverage,
        });
    }
    best
}

/// See [`median_interval`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Interval {
    pub low: f64,
    pub high: f64,
    /// The interval's exact coverage, at least the confidence asked for.
    pub coverage: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize) -> Vec<f64> {
        (1..=n).map(|i| i as f64).collect()
    }

    #[test]
    fn too_few_rounds_have_no_95_percent_interval() {
        assert_eq!(median_interval(&[], 0.95), None);
        // Five rounds: even min..max misses the median 1 time in 16.
        assert_eq!(median_interval(&values(5), 0.95), None);
        let five = median_interval(&values(5), 0.9).unwrap();
        assert_eq!((five.low, five.high), (1.0, 5.0));
        assert!((five.coverage - 0.9375).abs() < 1e-12);
    }

    #[test]
    fn intervals_match_the_binomial_tables() {
        // n = 6: min..max, 1 - 2/64.
        let six = median_interval(&values(6), 0.95).unwrap();
        assert_eq!((six.low, six.high), (1.0, 6.0));
        assert!((six.coverage - 0.96875).abs() < 1e-12);
        // n = 10: x(2)..x(9), 1 - 2 * 11/1024.
        let ten = median_interval(&values(10), 0.95).unwrap();
        assert_eq!((ten.low, ten.high), (2.0, 9.0));
        assert!((ten.coverage - (1.0 - 22.0 / 1024.0)).abs() < 1e-12);
        // n = 38 (session 14's pool): x(13)..x(26), the usual table value.
        let pool = median_interval(&values(38), 0.95).unwrap();
        assert_eq!((pool.low, pool.high), (13.0, 26.0));
        assert!(pool.coverage >= 0.95);
        // n = 99, the most rounds the CLI takes: finite and inside the data.
        let most = median_interval(&values(99), 0.95).unwrap();
        assert!(most.low > 1.0 && most.high < 99.0 && most.low < 50.0 && most.high > 50.0);
    }
}
