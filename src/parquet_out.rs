//! Parquet files in the classic Arrow types (`string`, `list`), which every reader can filter and
//! write back.
//!
//! polars' own writer stores strings as Arrow `string_view` and lists as `large_list` in the file's
//! Arrow schema; pyarrow 26 reads such files but cannot filter or write them back, and `datasets`
//! aborts on them. The Parquet data is the same either way: only the Arrow schema kept in the footer
//! (`ARROW:schema`) differs, so the columns are encoded from polars' oldest Arrow form and the footer
//! names the plain types.

use std::io::Write;

use polars::io::parquet::write::ParquetCompression;
use polars::prelude::*;
use polars_parquet::write::{
    get_dtype_encoding, row_group_iter, schema_to_metadata_key, to_parquet_schema, Encoding,
    FileWriter, KeyValue, ParquetType, StatisticsOptions, Version, WriteOptions,
};

/// Writes data frames of one schema as row groups, then the footer.
pub struct ClassicWriter<W: Write> {
    writer: FileWriter<W>,
    encodings: Vec<Vec<Encoding>>,
    fields: Vec<ParquetType>,
    options: WriteOptions,
    metadata: Vec<KeyValue>,
}

impl<W: Write> ClassicWriter<W> {
    /// A file whose rows all have `schema`; `metadata` goes into the footer beside the Arrow schema.
    pub fn new(out: W, schema: &Schema, metadata: &[(String, String)]) -> PolarsResult<Self> {
        let written = schema.to_arrow(CompatLevel::oldest());
        let parquet_schema = to_parquet_schema(&written)?;
        let fields = parquet_schema.fields().to_vec();
        let encodings = written
            .iter_values()
            .map(|f| get_dtype_encoding(&f.dtype))
            .collect();
        let classic: ArrowSchema = written
            .iter_values()
            .map(|f| {
                let f = classic_field(f);
                (f.name.clone(), f)
            })
            .collect();
        let mut kv = vec![schema_to_metadata_key(&classic)];
        kv.extend(metadata.iter().map(|(k, v)| KeyValue {
            key: k.clone(),
            value: Some(v.clone()),
        }));
        let options = WriteOptions {
            statistics: StatisticsOptions::default(),
            compression: ParquetCompression::default().into(),
            version: Version::V1,
            data_page_size: None,
        };
        Ok(Self {
            writer: FileWriter::new_with_parquet_schema(out, classic, parquet_schema, options),
            encodings,
            fields,
            options,
            metadata: kv,
        })
    }

    /// One row group per chunk of `frame`, which must have the writer's schema.
    pub fn write(&mut self, frame: &mut DataFrame) -> PolarsResult<()> {
        if frame.should_rechunk() {
            frame.align_chunks_par();
        }
        for batch in frame.iter_chunks(CompatLevel::oldest(), false) {
            let rows = batch.len();
            if rows == 0 {
                continue;
            }
            let encodings: Vec<Vec<Encoding>> = self.encodings.clone();
            let group = row_group_iter(batch, encodings.into(), self.fields.clone(), self.options);
            self.writer.write(rows as u64, group)?;
        }
        Ok(())
    }

    /// Writes the footer and hands back the output.
    pub fn finish(mut self) -> PolarsResult<W> {
        self.writer.end(Some(std::mem::take(&mut self.metadata)))?;
        Ok(self.writer.into_inner())
    }
}

/// A whole frame as one Parquet file in memory.
pub fn to_bytes(frame: &mut DataFrame) -> PolarsResult<Vec<u8>> {
    let mut w = ClassicWriter::new(Vec::new(), frame.schema(), &[])?;
    w.write(frame)?;
    w.finish()
}

/// The same field with `large_utf8`, `large_binary` and `large_list` (polars' oldest forms) named as
/// their plain counterparts, at every depth; readers convert the 64-bit offsets on read.
fn classic_field(field: &ArrowField) -> ArrowField {
    let mut f = field.clone();
    f.dtype = classic_type(&field.dtype);
    f
}

fn classic_type(dtype: &ArrowDataType) -> ArrowDataType {
    match dtype {
        ArrowDataType::LargeUtf8 | ArrowDataType::Utf8View => ArrowDataType::Utf8,
        ArrowDataType::LargeBinary | ArrowDataType::BinaryView => ArrowDataType::Binary,
        ArrowDataType::LargeList(inner) | ArrowDataType::List(inner) => {
            ArrowDataType::List(Box::new(classic_field(inner)))
        }
        ArrowDataType::FixedSizeList(inner, n) => {
            ArrowDataType::FixedSizeList(Box::new(classic_field(inner)), *n)
        }
        ArrowDataType::Struct(fields) => {
            ArrowDataType::Struct(fields.iter().map(classic_field).collect())
        }
        ArrowDataType::Dictionary(keys, values, ordered) => {
            ArrowDataType::Dictionary(*keys, Box::new(classic_type(values)), *ordered)
        }
        other => other.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nested_large_and_view_types_become_plain() {
        let field = |name: &str, dtype| ArrowField::new(name.into(), dtype, true);
        let messages = ArrowDataType::LargeList(Box::new(field(
            "item",
            ArrowDataType::Struct(vec![
                field("role", ArrowDataType::Utf8View),
                field("content", ArrowDataType::LargeUtf8),
            ]),
        )));
        let want = ArrowDataType::List(Box::new(field(
            "item",
            ArrowDataType::Struct(vec![
                field("role", ArrowDataType::Utf8),
                field("content", ArrowDataType::Utf8),
            ]),
        )));
        assert_eq!(classic_type(&messages), want);
        assert_eq!(
            classic_type(&ArrowDataType::LargeBinary),
            ArrowDataType::Binary
        );
        assert_eq!(
            classic_type(&ArrowDataType::Float32),
            ArrowDataType::Float32
        );
    }

    #[test]
    fn a_written_frame_reads_back_equal() {
        let mut df = DataFrame::new_infer_height(vec![
            Column::new("id".into(), ["a", "b", "c"]),
            Column::new("score".into(), [Some(1.5f32), None, Some(-2.0)]),
        ])
        .unwrap();
        let bytes = to_bytes(&mut df).unwrap();
        let back = ParquetReader::new(std::io::Cursor::new(bytes))
            .finish()
            .unwrap();
        assert!(back.equals_missing(&df));
    }
}
