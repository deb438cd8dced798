//! SVG plots of a run (feature `sim-plot`): per-flow throughput, queueing delay and cwnd
//! over time, stacked.

use std::path::Path;

use plotters::prelude::*;

use super::Report;

const COLOURS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

/// A labelled line: name, points, colour.
type Line<'a> = (String, &'a Vec<(f64, f64)>, RGBColor);

pub(super) fn write_svg(report: &Report, path: &Path) -> Result<(), String> {
    let err = |e: &dyn std::fmt::Display| e.to_string();
    let root = SVGBackend::new(path, (1000, 900)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let panels = root.split_evenly((3, 1));
    let t_end = report.duration.as_secs_f64().max(1e-3);
    let xs: Vec<f64> = report.samples.iter().map(|s| s.at.as_secs_f64()).collect();

    let series = |get: &dyn Fn(usize, usize) -> f64| -> Vec<Vec<(f64, f64)>> {
        (0..report.flows.len())
            .map(|f| (0..xs.len()).map(|i| (xs[i], get(i, f))).collect())
            .collect()
    };
    let tput = series(&|i, f| report.samples[i].flows[f].throughput_bps / 1e6);
    let cwnd = series(&|i, f| report.samples[i].flows[f].cwnd as f64 / 1e3);
    let delay: Vec<(f64, f64)> = report
        .samples
        .iter()
        .map(|s| (s.at.as_secs_f64(), s.queue_delay.as_secs_f64() * 1e3))
        .collect();
    let link: Vec<(f64, f64)> = report
        .samples
        .iter()
        .map(|s| (s.at.as_secs_f64(), s.link_rate_bps / 1e6))
        .collect();

    let max_of = |v: &mut dyn Iterator<Item = f64>| v.fold(1e-3, f64::max) * 1.1;
    let y_tput = max_of(
        &mut tput
            .iter()
            .flatten()
            .map(|p| p.1)
            .chain(link.iter().map(|p| p.1)),
    );
    let y_cwnd = max_of(&mut cwnd.iter().flatten().map(|p| p.1));
    let y_delay = max_of(&mut delay.iter().map(|p| p.1));

    let draw = |area: &DrawingArea<SVGBackend<'_>, plotters::coord::Shift>,
                title: &str,
                y_max: f64,
                lines: &[Line<'_>]|
     -> Result<(), String> {
        let mut chart = ChartBuilder::on(area)
            .caption(title, ("sans-serif", 18))
            .margin(8)
            .x_label_area_size(30)
            .y_label_area_size(50)
            .build_cartesian_2d(0.0..t_end, 0.0..y_max)
            .map_err(|e| err(&e))?;
        chart.configure_mesh().draw().map_err(|e| err(&e))?;
        for (name, pts, colour) in lines {
            let c = *colour;
            chart
                .draw_series(LineSeries::new(pts.iter().copied(), c))
                .map_err(|e| err(&e))?
                .label(name.clone())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 15, y)], c));
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| err(&e))?;
        Ok(())
    };

    let mut lines: Vec<Line<'_>> = report
        .flows
        .iter()
        .enumerate()
        .map(|(i, f)| (f.name.clone(), &tput[i], COLOURS[i % COLOURS.len()]))
        .collect();
    lines.push(("link".into(), &link, RGBColor(0, 0, 0)));
    draw(&panels[0], "throughput (Mbit/s)", y_tput, &lines)?;
    draw(
        &panels[1],
        "queueing delay (ms)",
        y_delay,
        &[("queue".into(), &delay, RGBColor(0, 0, 0))],
    )?;
    let lines: Vec<Line<'_>> = report
        .flows
        .iter()
        .enumerate()
        .map(|(i, f)| (f.name.clone(), &cwnd[i], COLOURS[i % COLOURS.len()]))
        .collect();
    draw(&panels[2], "cwnd (kB)", y_cwnd, &lines)?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}
