//! Parameters encoded up front, so that a statement in flight owns everything it needs and
//! can be handed to a spawned task when its caller's future is dropped.

use std::error::Error as StdError;
use std::fmt;
use std::sync::Mutex;

use bytes::BytesMut;
use tokio_postgres::types::{Format, IsNull, ToSql, Type, to_sql_checked};

type BoxError = Box<dyn StdError + Sync + Send>;

/// One parameter, already in its wire form (or the error its encoding gave, reported when
/// tokio-postgres encodes it, so the error is the driver's own).
#[derive(Debug)]
pub(crate) struct Encoded {
    value: Result<Option<Vec<u8>>, Mutex<Option<BoxError>>>,
    format: Format,
}

impl Encoded {
    /// Encodes `params` for the statement's parameter `types`. A count mismatch is left
    /// for tokio-postgres to report.
    pub(crate) fn all(params: &[&(dyn ToSql + Sync)], types: &[Type]) -> Vec<Encoded> {
        params
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let ty = types.get(i).unwrap_or(&Type::UNKNOWN);
                let mut out = BytesMut::new();
                let value = match p.to_sql_checked(ty, &mut out) {
                    Ok(IsNull::Yes) => Ok(None),
                    Ok(IsNull::No) => Ok(Some(out.to_vec())),
                    Err(e) => Err(Mutex::new(Some(e))),
                };
                Encoded {
                    value,
                    format: p.encode_format(ty),
                }
            })
            .collect()
    }
}

impl ToSql for Encoded {
    fn to_sql(&self, _: &Type, out: &mut BytesMut) -> Result<IsNull, BoxError> {
        match &self.value {
            Ok(None) => Ok(IsNull::Yes),
            Ok(Some(bytes)) => {
                out.extend_from_slice(bytes);
                Ok(IsNull::No)
            }
            Err(e) => Err(e
                .lock()
                .ok()
                .and_then(|mut e| e.take())
                .unwrap_or_else(|| Box::new(Reported))),
        }
    }

    fn accepts(_: &Type) -> bool {
        true // checked when encoded, against the statement's own types
    }

    fn encode_format(&self, _: &Type) -> Format {
        match self.format {
            Format::Text => Format::Text,
            Format::Binary => Format::Binary,
        }
    }

    to_sql_checked!();
}

/// Stands for an encoding error already handed over once.
#[derive(Debug)]
struct Reported;

impl fmt::Display for Reported {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("parameter could not be encoded")
    }
}

impl StdError for Reported {}

#[cfg(test)]
mod tests {
    use super::*;

    fn wire(e: &Encoded, ty: &Type) -> Result<Option<Vec<u8>>, String> {
        let mut out = BytesMut::new();
        match e.to_sql_checked(ty, &mut out) {
            Ok(IsNull::Yes) => Ok(None),
            Ok(IsNull::No) => Ok(Some(out.to_vec())),
            Err(err) => Err(err.to_string()),
        }
    }

    #[test]
    fn values_nulls_and_formats_survive_encoding() {
        let none: Option<i32> = None;
        let params: [&(dyn ToSql + Sync); 3] = [&7_i32, &none, &"hi"];
        let types = [Type::INT4, Type::INT4, Type::TEXT];
        let enc = Encoded::all(&params, &types);
        assert_eq!(
            wire(&enc[0], &types[0]),
            Ok(Some(7_i32.to_be_bytes().to_vec()))
        );
        assert_eq!(wire(&enc[1], &types[1]), Ok(None));
        assert_eq!(wire(&enc[2], &types[2]), Ok(Some(b"hi".to_vec())));
        assert!(matches!(enc[0].encode_format(&types[0]), Format::Binary));
    }

    #[test]
    fn a_wrong_type_is_reported_once_with_the_drivers_error() {
        let params: [&(dyn ToSql + Sync); 1] = [&7_i32];
        let enc = Encoded::all(&params, &[Type::TEXT]);
        let first = wire(&enc[0], &Type::TEXT).unwrap_err();
        assert!(first.contains("i32") || first.contains("text"), "{first}");
        assert_eq!(
            wire(&enc[0], &Type::TEXT).unwrap_err(),
            "parameter could not be encoded"
        );
    }
}
