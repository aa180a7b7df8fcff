//! Prints a progressive RoPE schedule's stages and, per stage, which rotary pairs keep
//! their frequency, which are interpolated and which are blended (YaRN's ramp, Llama 3.1's
//! smoothing), with the wavelength range of each band.
//!
//!     cargo run --release --example rope_schedule             # the three presets
//!     cargo run --release --example rope_schedule -- my.json  # a schedule of your own

use longctx::rope::{frequency_bands, Band, RopeSchedule};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let schedules = match std::env::args().nth(1) {
        Some(path) => {
            let text = std::fs::read_to_string(&path)?;
            vec![(path, RopeSchedule::from_json(&text)?)]
        }
        None => vec![
            ("Code Llama".to_string(), RopeSchedule::code_llama(128)?),
            ("Qwen2.5".to_string(), RopeSchedule::qwen2_5(128)?),
            ("Llama 3.1".to_string(), RopeSchedule::llama3_1(128)?),
        ],
    };
    for (name, s) in schedules {
        println!("{name}");
        for (st, end) in s.stages().iter().zip(s.boundaries()) {
            let c = &st.config;
            println!(
                "  {:<40} seq_len {:>7}  base {:>9}  {:<8} attention factor {:.6}  ends at {}",
                st.name,
                st.seq_len,
                c.base(),
                c.scaling().rope_type(),
                c.attention_factor_f64(),
                end.map_or("?".to_string(), |t| format!("{t} tokens"))
            );
            let bands = frequency_bands(c, st.seq_len);
            for band in [Band::Unchanged, Band::Blended, Band::Interpolated] {
                let pairs: Vec<_> = bands.iter().filter(|b| b.band == band).collect();
                if let (Some(first), Some(last)) = (pairs.first(), pairs.last()) {
                    println!(
                        "      {:<12} pairs {:>2}..={:<2} ({:>2})  wavelength {:>12.1} .. {:<12.1}",
                        format!("{band:?}"),
                        first.pair,
                        last.pair,
                        pairs.len(),
                        first.wavelength,
                        last.wavelength
                    );
                }
            }
        }
        println!();
    }
    Ok(())
}
