//! The agent's MQTT decoder on any topic and payload (the first byte of the input says how long
//! the topic is): every reading it emits validates, and a message without readings is counted.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tributary_agent::decode::Decoder;
use tributary_shared::Reading;
use tributary_shared::reading::validate_ts_at;

const NOW: i64 = 1_764_000_000_000;
const SKEW: i64 = 300_000;

fuzz_target!(|data: &[u8]| {
    let Some((&n, rest)) = data.split_first() else { return };
    let (topic, payload) = rest.split_at((n as usize).min(rest.len()));
    let decoder = Decoder::new(&["sensors/#".to_string(), "site/+/meters/#".to_string()], 4096, SKEW);
    let mut readings = Vec::new();
    let mut rejects = 0;
    let n = decoder.decode(
        topic,
        payload,
        NOW,
        |sensor, ts, value| readings.push(Reading { sensor: sensor.to_string(), ts, value }),
        |_| rejects += 1,
    );
    assert_eq!(n, readings.len());
    for r in &readings {
        r.validate().expect("an emitted reading validates");
        validate_ts_at(r.ts, NOW, SKEW).expect("an emitted reading is not too far ahead");
    }
    assert!(n > 0 || rejects > 0, "a message without readings must be counted");
});
