//! Metadata values. GGUF metadata is a flat list of `key → typed value`; arrays are homogeneous
//! and (in this implementation, as in every real-world file) never contain other arrays, so
//! [`Array`] stores one plain `Vec` per element type instead of a `Vec<Value>`. That keeps a
//! 262 144-entry token vocabulary as one `Vec<String>` with no per-element enum tag.

/// On-disk ids of metadata value types.
pub(crate) mod type_id {
    pub const U8: u32 = 0;
    pub const I8: u32 = 1;
    pub const U16: u32 = 2;
    pub const I16: u32 = 3;
    pub const U32: u32 = 4;
    pub const I32: u32 = 5;
    pub const F32: u32 = 6;
    pub const BOOL: u32 = 7;
    pub const STRING: u32 = 8;
    pub const ARRAY: u32 = 9;
    pub const U64: u32 = 10;
    pub const I64: u32 = 11;
    pub const F64: u32 = 12;
}

/// One metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Array),
}

/// A homogeneous metadata array, one variant per element type.
#[derive(Debug, Clone, PartialEq)]
pub enum Array {
    U8(Vec<u8>),
    I8(Vec<i8>),
    U16(Vec<u16>),
    I16(Vec<i16>),
    U32(Vec<u32>),
    I32(Vec<i32>),
    U64(Vec<u64>),
    I64(Vec<i64>),
    F32(Vec<f32>),
    F64(Vec<f64>),
    Bool(Vec<bool>),
    String(Vec<String>),
}

impl Value {
    /// The on-disk type id of this value.
    pub fn type_id(&self) -> u32 {
        use type_id as t;
        match self {
            Value::U8(_) => t::U8,
            Value::I8(_) => t::I8,
            Value::U16(_) => t::U16,
            Value::I16(_) => t::I16,
            Value::U32(_) => t::U32,
            Value::I32(_) => t::I32,
            Value::U64(_) => t::U64,
            Value::I64(_) => t::I64,
            Value::F32(_) => t::F32,
            Value::F64(_) => t::F64,
            Value::Bool(_) => t::BOOL,
            Value::String(_) => t::STRING,
            Value::Array(_) => t::ARRAY,
        }
    }

    /// Human-readable type name (`"u32"`, `"string"`, `"array[f32]"`, …) for messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::U8(_) => "u8",
            Value::I8(_) => "i8",
            Value::U16(_) => "u16",
            Value::I16(_) => "i16",
            Value::U32(_) => "u32",
            Value::I32(_) => "i32",
            Value::U64(_) => "u64",
            Value::I64(_) => "i64",
            Value::F32(_) => "f32",
            Value::F64(_) => "f64",
            Value::Bool(_) => "bool",
            Value::String(_) => "string",
            Value::Array(a) => a.type_name(),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    /// Any integer type whose value is non-negative. Writers disagree on which integer width they
    /// use for counts (u32 vs u64 vs i32), so readers should not care.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// Any integer type whose value fits in an `i64`.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::U64(v) => i64::try_from(v).ok(),
            Value::I8(v) => Some(v.into()),
            Value::I16(v) => Some(v.into()),
            Value::I32(v) => Some(v.into()),
            Value::I64(v) => Some(v),
            _ => None,
        }
    }

    /// `f32`, or `f64` rounded to `f32`.
    pub fn as_f32(&self) -> Option<f32> {
        match *self {
            Value::F32(v) => Some(v),
            Value::F64(v) => Some(v as f32),
            _ => None,
        }
    }

    /// `f64` or `f32` (widened exactly).
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v.into()),
            Value::F64(v) => Some(v),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(v) => Some(v),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&Array> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
}

impl Array {
    /// On-disk type id of the elements.
    pub fn elem_type_id(&self) -> u32 {
        use type_id as t;
        match self {
            Array::U8(_) => t::U8,
            Array::I8(_) => t::I8,
            Array::U16(_) => t::U16,
            Array::I16(_) => t::I16,
            Array::U32(_) => t::U32,
            Array::I32(_) => t::I32,
            Array::U64(_) => t::U64,
            Array::I64(_) => t::I64,
            Array::F32(_) => t::F32,
            Array::F64(_) => t::F64,
            Array::Bool(_) => t::BOOL,
            Array::String(_) => t::STRING,
        }
    }

    pub fn type_name(&self) -> &'static str {
        match self {
            Array::U8(_) => "array[u8]",
            Array::I8(_) => "array[i8]",
            Array::U16(_) => "array[u16]",
            Array::I16(_) => "array[i16]",
            Array::U32(_) => "array[u32]",
            Array::I32(_) => "array[i32]",
            Array::U64(_) => "array[u64]",
            Array::I64(_) => "array[i64]",
            Array::F32(_) => "array[f32]",
            Array::F64(_) => "array[f64]",
            Array::Bool(_) => "array[bool]",
            Array::String(_) => "array[string]",
        }
    }

    pub fn len(&self) -> usize {
        match self {
            Array::U8(v) => v.len(),
            Array::I8(v) => v.len(),
            Array::U16(v) => v.len(),
            Array::I16(v) => v.len(),
            Array::U32(v) => v.len(),
            Array::I32(v) => v.len(),
            Array::U64(v) => v.len(),
            Array::I64(v) => v.len(),
            Array::F32(v) => v.len(),
            Array::F64(v) => v.len(),
            Array::Bool(v) => v.len(),
            Array::String(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn as_strings(&self) -> Option<&[String]> {
        match self {
            Array::String(v) => Some(v),
            _ => None,
        }
    }

    pub fn as_f32s(&self) -> Option<&[f32]> {
        match self {
            Array::F32(v) => Some(v),
            _ => None,
        }
    }

    pub fn as_i32s(&self) -> Option<&[i32]> {
        match self {
            Array::I32(v) => Some(v),
            _ => None,
        }
    }

    pub fn as_u32s(&self) -> Option<&[u32]> {
        match self {
            Array::U32(v) => Some(v),
            _ => None,
        }
    }

    pub fn as_u8s(&self) -> Option<&[u8]> {
        match self {
            Array::U8(v) => Some(v),
            _ => None,
        }
    }

    pub fn as_bools(&self) -> Option<&[bool]> {
        match self {
            Array::Bool(v) => Some(v),
            _ => None,
        }
    }

    /// The elements of any integer array as `i64`; `None` for non-integer arrays or if a `u64`
    /// element does not fit. Useful where writers disagree on the integer width (token types,
    /// per-layer head counts).
    pub fn to_i64s(&self) -> Option<Vec<i64>> {
        fn conv<T: Copy>(v: &[T], f: impl Fn(T) -> Option<i64>) -> Option<Vec<i64>> {
            v.iter().map(|&x| f(x)).collect()
        }
        match self {
            Array::U8(v) => conv(v, |x| Some(x.into())),
            Array::I8(v) => conv(v, |x| Some(x.into())),
            Array::U16(v) => conv(v, |x| Some(x.into())),
            Array::I16(v) => conv(v, |x| Some(x.into())),
            Array::U32(v) => conv(v, |x| Some(x.into())),
            Array::I32(v) => conv(v, |x| Some(x.into())),
            Array::U64(v) => conv(v, |x| i64::try_from(x).ok()),
            Array::I64(v) => Some(v.clone()),
            _ => None,
        }
    }

    /// The elements of an `f32` or `f64` array as `f32`.
    pub fn to_f32s(&self) -> Option<Vec<f32>> {
        match self {
            Array::F32(v) => Some(v.clone()),
            Array::F64(v) => Some(v.iter().map(|&x| x as f32).collect()),
            _ => None,
        }
    }
}

macro_rules! impl_from {
    ($($t:ty => $v:ident),* $(,)?) => {$(
        impl From<$t> for Value {
            fn from(x: $t) -> Self { Value::$v(x) }
        }
        impl From<Vec<$t>> for Array {
            fn from(x: Vec<$t>) -> Self { Array::$v(x) }
        }
        impl From<Vec<$t>> for Value {
            fn from(x: Vec<$t>) -> Self { Value::Array(Array::$v(x)) }
        }
    )*};
}

impl_from!(
    u8 => U8, i8 => I8, u16 => U16, i16 => I16, u32 => U32, i32 => I32,
    u64 => U64, i64 => I64, f32 => F32, f64 => F64, bool => Bool, String => String,
);

impl From<&str> for Value {
    fn from(s: &str) -> Self {
        Value::String(s.to_owned())
    }
}

impl From<Array> for Value {
    fn from(a: Array) -> Self {
        Value::Array(a)
    }
}

impl From<Vec<&str>> for Array {
    fn from(v: Vec<&str>) -> Self {
        Array::String(v.into_iter().map(str::to_owned).collect())
    }
}

impl From<Vec<&str>> for Value {
    fn from(v: Vec<&str>) -> Self {
        Value::Array(v.into())
    }
}

/// Scalars print plainly, strings quoted (and cut after 60 characters), arrays as a short
/// summary: for listings such as `modu info`, not for round-tripping.
impl std::fmt::Display for Value {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Value::U8(v) => write!(f, "{v}"),
            Value::I8(v) => write!(f, "{v}"),
            Value::U16(v) => write!(f, "{v}"),
            Value::I16(v) => write!(f, "{v}"),
            Value::U32(v) => write!(f, "{v}"),
            Value::I32(v) => write!(f, "{v}"),
            Value::U64(v) => write!(f, "{v}"),
            Value::I64(v) => write!(f, "{v}"),
            Value::F32(v) => write!(f, "{v}"),
            Value::F64(v) => write!(f, "{v}"),
            Value::Bool(v) => write!(f, "{v}"),
            Value::String(s) => {
                const MAX: usize = 60;
                match s.char_indices().nth(MAX) {
                    Some((cut, _)) => write!(f, "{:?}…", &s[..cut]),
                    None => write!(f, "{s:?}"),
                }
            }
            Value::Array(a) => write!(f, "{} with {} elements", a.type_name(), a.len()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integer_accessors_accept_any_width() {
        assert_eq!(Value::U8(7).as_u64(), Some(7));
        assert_eq!(Value::I32(7).as_u64(), Some(7));
        assert_eq!(Value::I64(-1).as_u64(), None);
        assert_eq!(Value::U64(u64::MAX).as_i64(), None);
        assert_eq!(Value::I16(-5).as_i64(), Some(-5));
        assert_eq!(Value::F32(1.0).as_u64(), None);
        assert_eq!(Value::Bool(true).as_u64(), None);
    }

    #[test]
    fn float_accessors() {
        assert_eq!(Value::F64(0.5).as_f32(), Some(0.5));
        assert_eq!(Value::F32(0.25).as_f64(), Some(0.25));
        assert_eq!(Value::U32(1).as_f32(), None);
    }

    #[test]
    fn array_conversions() {
        let a = Array::U32(vec![1, 2, 3]);
        assert_eq!(a.to_i64s(), Some(vec![1, 2, 3]));
        assert_eq!(Array::U64(vec![u64::MAX]).to_i64s(), None);
        assert_eq!(Array::F64(vec![0.5]).to_f32s(), Some(vec![0.5]));
        assert_eq!(Array::String(vec![]).to_i64s(), None);
        assert_eq!(a.as_i32s(), None);
        assert_eq!(a.len(), 3);
    }

    #[test]
    fn type_ids_and_from() {
        let v: Value = vec!["a", "b"].into();
        assert_eq!(v.type_id(), type_id::ARRAY);
        assert_eq!(v.as_array().map(Array::elem_type_id), Some(type_id::STRING));
        assert_eq!(Value::from(3u16).type_id(), type_id::U16);
        assert_eq!(Value::from(3i64).type_id(), type_id::I64);
        assert_eq!(Value::from("x").as_str(), Some("x"));
    }

    #[test]
    fn display_is_short() {
        assert_eq!(Value::U32(5).to_string(), "5");
        assert_eq!(Value::from("hi").to_string(), "\"hi\"");
        let long = Value::String("x".repeat(100));
        assert!(long.to_string().chars().count() < 70);
        let a: Value = vec![1.0f32, 2.0].into();
        assert_eq!(a.to_string(), "array[f32] with 2 elements");
    }
}
