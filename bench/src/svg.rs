//! A labelled log-log scatter plot as a standalone SVG file (no fonts or
//! native libraries needed to draw it).

use std::fmt::Write;

/// Points of one colour: (x, y, label).
pub struct Series {
    /// Legend entry.
    pub name: String,
    /// The points.
    pub points: Vec<(f64, f64, String)>,
}

const WIDTH: f64 = 1100.0;
const HEIGHT: f64 = 680.0;
const LEFT: f64 = 80.0;
const RIGHT: f64 = 290.0;
const TOP: f64 = 50.0;
const BOTTOM: f64 = 70.0;
const COLOURS: [&str; 8] = [
    "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf",
];

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Decades covering `values` (log10 bounds, at least one decade wide).
fn decades(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (mut low, mut high) = (f64::INFINITY, f64::NEG_INFINITY);
    for value in values.filter(|v| *v > 0.0 && v.is_finite()) {
        // A small tolerance keeps 0.9999 (a ratio of 1 less frame headers)
        // in the decade of 1.
        low = low.min((value.log10() + 1e-3).floor());
        high = high.max((value.log10() - 1e-3).ceil());
    }
    if !low.is_finite() {
        return (0.0, 1.0);
    }
    if high <= low {
        high = low + 1.0;
    }
    (low, high)
}

/// Draws the plot; `key` lines are listed under the series legend (what the
/// point labels stand for).
pub fn scatter(
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
    key: &[String],
) -> String {
    let all = || series.iter().flat_map(|s| s.points.iter());
    let (x_low, x_high) = decades(all().map(|p| p.0));
    let (y_low, y_high) = decades(all().map(|p| p.1));
    let plot_width = WIDTH - LEFT - RIGHT;
    let plot_height = HEIGHT - TOP - BOTTOM;
    let x_at = |x: f64| LEFT + (x.max(1e-9).log10() - x_low) / (x_high - x_low) * plot_width;
    let y_at =
        |y: f64| TOP + plot_height - (y.max(1e-9).log10() - y_low) / (y_high - y_low) * plot_height;
    let mut svg = String::new();
    // Writing to a String cannot fail.
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(svg, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        svg,
        r#"<text x="{}" y="28" text-anchor="middle" font-size="16">{}</text>"#,
        LEFT + plot_width / 2.0,
        escape(title)
    );
    // Grid and ticks at 1, 2 and 5 times each power of ten.
    for decade in decade_of(x_low)..=decade_of(x_high) {
        for factor in [1.0, 2.0, 5.0] {
            let value = factor * 10f64.powi(decade);
            if value.log10() > x_high + 1e-9 {
                continue;
            }
            let x = x_at(value);
            let stroke = if factor == 1.0 { "#bbb" } else { "#eee" };
            let _ = writeln!(
                svg,
                r#"<line x1="{x:.1}" y1="{TOP}" x2="{x:.1}" y2="{}" stroke="{stroke}"/><text x="{x:.1}" y="{}" text-anchor="middle">{value}</text>"#,
                TOP + plot_height,
                TOP + plot_height + 18.0
            );
        }
    }
    for decade in decade_of(y_low)..=decade_of(y_high) {
        for factor in [1.0, 2.0, 5.0] {
            let value = factor * 10f64.powi(decade);
            if value.log10() > y_high + 1e-9 {
                continue;
            }
            let y = y_at(value);
            let stroke = if factor == 1.0 { "#bbb" } else { "#eee" };
            let _ = writeln!(
                svg,
                r#"<line x1="{LEFT}" y1="{y:.1}" x2="{}" y2="{y:.1}" stroke="{stroke}"/><text x="{}" y="{:.1}" text-anchor="end">{value}</text>"#,
                LEFT + plot_width,
                LEFT - 6.0,
                y + 4.0
            );
        }
    }
    let _ = writeln!(
        svg,
        r#"<rect x="{LEFT}" y="{TOP}" width="{plot_width}" height="{plot_height}" fill="none" stroke="black"/>"#
    );
    let _ = writeln!(
        svg,
        r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#,
        LEFT + plot_width / 2.0,
        HEIGHT - 20.0,
        escape(x_label)
    );
    let _ = writeln!(
        svg,
        r#"<text x="20" y="{}" text-anchor="middle" transform="rotate(-90 20 {})">{}</text>"#,
        TOP + plot_height / 2.0,
        TOP + plot_height / 2.0,
        escape(y_label)
    );
    for (index, series) in series.iter().enumerate() {
        let colour = COLOURS[index % COLOURS.len()];
        for (x, y, label) in &series.points {
            let (px, py) = (x_at(*x), y_at(*y));
            let _ = writeln!(
                svg,
                r#"<circle cx="{px:.1}" cy="{py:.1}" r="4" fill="{colour}"/><text x="{:.1}" y="{:.1}" font-size="10" fill="{colour}">{}</text>"#,
                px + 6.0,
                py - 4.0,
                escape(label)
            );
        }
        let legend_y = TOP + 10.0 + index as f64 * 20.0;
        let _ = writeln!(
            svg,
            r#"<circle cx="{}" cy="{legend_y}" r="5" fill="{colour}"/><text x="{}" y="{}">{}</text>"#,
            WIDTH - RIGHT + 20.0,
            WIDTH - RIGHT + 32.0,
            legend_y + 4.0,
            escape(&series.name)
        );
    }
    let key_top = TOP + 30.0 + series.len() as f64 * 20.0;
    for (index, line) in key.iter().enumerate() {
        let _ = writeln!(
            svg,
            r#"<text x="{}" y="{:.1}" font-size="11">{}</text>"#,
            WIDTH - RIGHT + 14.0,
            key_top + index as f64 * 16.0,
            escape(line)
        );
    }
    svg.push_str("</svg>\n");
    svg
}

/// The power of ten a log10 value lies in (plots span a few decades).
#[expect(
    clippy::cast_possible_truncation,
    reason = "log10 of plotted values is a small number, and float-to-int `as` saturates"
)]
fn decade_of(log10: f64) -> i32 {
    log10 as i32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plot_holds_every_point_and_escapes_labels() {
        let series = [Series {
            name: "redis".to_owned(),
            points: vec![
                (100.0, 2.0, "a<b".to_owned()),
                (5000.0, 8.0, "c".to_owned()),
            ],
        }];

        let svg = scatter("t", "x", "y", &series, &["1 raw".to_owned()]);

        assert_eq!(svg.matches("<circle").count(), 3); // Two points, one legend dot.
        assert!(svg.contains("a&lt;b"));
    }

    #[test]
    fn decades_cover_the_values() {
        assert_eq!(decades([3.0, 250.0].into_iter()), (0.0, 3.0));
        assert_eq!(decades([0.9999, 5.0].into_iter()), (0.0, 1.0));
    }
}
