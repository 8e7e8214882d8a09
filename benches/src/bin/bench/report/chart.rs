//! The SVG chart: instructions per request as a ratio to bare axum.

use std::path::Path;

use plotters::prelude::*;

use super::figures::ratio;
use crate::Results;
use crate::instructions::ROWS;

/// A row's short name under the chart's bars.
pub(super) fn bar_name(label: &str, serve: &str) -> String {
    match serve {
        "axum" => label.to_owned(),
        "reqctx" => format!("serve {label}"),
        _ => "serve no timer".to_owned(),
    }
}

/// The chart: instructions per request as a ratio to bare under plain `axum::serve`, per
/// row, both protocols. Written only by a run that counted instructions.
pub(crate) fn chart(r: &Results, path: &Path) -> Result<(), String> {
    let cases = match &r.instructions {
        Some(Ok(c)) => c.as_slice(),
        _ => return Ok(()),
    };
    let rows: Vec<(&str, &str)> = ROWS
        .iter()
        .map(|(l, s, _)| (*l, *s))
        .filter(|row| *row != ("bare", "axum"))
        .collect();
    let labels: Vec<String> = rows.iter().map(|(l, s)| bar_name(l, s)).collect();
    let bars: Vec<(usize, bool, f64)> = rows
        .iter()
        .enumerate()
        .flat_map(|(i, (l, sv))| {
            [false, true]
                .into_iter()
                .filter_map(move |h2| Some((i, h2, ratio(cases, l, sv, h2)?)))
        })
        .collect();
    let tower = ratio(cases, "tower-timeout", "axum", false);
    let top = bars.iter().map(|b| b.2).fold(1.2_f64, f64::max) + 0.08;
    let draw = || -> Result<(), Box<dyn std::error::Error>> {
        let root = SVGBackend::new(path, (1700, 560)).into_drawing_area();
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(
                "Instructions per request, ratio to bare axum under plain axum::serve (current-thread)",
                ("sans-serif", 20),
            )
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(-0.5f64..(labels.len() as f64 - 0.5), 0.9f64..top)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(labels.len())
            .x_label_style(("sans-serif", 11))
            .x_label_formatter(&|x| {
                let i = x.round();
                if (x - i).abs() < 0.01 && i >= 0.0 {
                    labels.get(i as usize).cloned().unwrap_or_default()
                } else {
                    String::new()
                }
            })
            .y_desc("× bare under axum::serve, same protocol")
            .y_label_formatter(&|y| format!("{y:.2}"))
            .draw()?;
        let h1 = RGBColor(70, 110, 170);
        let h2 = RGBColor(220, 140, 60);
        chart
            .draw_series(bars.iter().map(|(i, is_h2, v)| {
                let x = *i as f64 + if *is_h2 { 0.02 } else { -0.36 };
                let color = if *is_h2 { h2 } else { h1 };
                Rectangle::new([(x, 0.9), (x + 0.34, *v)], color.filled())
            }))?
            .label("HTTP/1.1")
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], h1.filled()));
        chart
            .draw_series(std::iter::empty::<Rectangle<(f64, f64)>>())?
            .label("HTTP/2")
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], h2.filled()));
        chart.draw_series(bars.iter().map(|(i, is_h2, v)| {
            let x = *i as f64 + if *is_h2 { 0.19 } else { -0.19 };
            Text::new(
                format!("{v:.2}"),
                (x - 0.14, *v + 0.012),
                ("sans-serif", 10).into_font(),
            )
        }))?;
        if let Some(t) = tower {
            let target = RGBColor(200, 40, 40);
            chart
                .draw_series(LineSeries::new(
                    [(-0.5, t), (labels.len() as f64 - 0.5, t)],
                    target.stroke_width(1),
                ))?
                .label("tower-http TimeoutLayer, HTTP/1.1 (the layer's target)")
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 14, y)], target));
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()?;
        root.present()?;
        Ok(())
    };
    draw().map_err(|e| format!("{path:?}: {e}"))
}
