"""The answer of an attribution, for people: top-k / bottom-k training rows per query and method, per-token
contributions that sum to each row's score, and a self-contained HTML report."""

from jaxinf.report.html import render_html, write_report
from jaxinf.report.select import (explain, method_directions, scores_and_directions, token_scores, top_bottom,
                                  top_rows_table)
