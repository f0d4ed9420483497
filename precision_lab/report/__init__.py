"""The offline HTML report: data read from run directories (`data`), its figures,
tables and scaling section, the page (`page`), and `write.write_report`, which assembles
and writes it. Imports plotly; reads run directories through `precision_lab.run`.
"""
